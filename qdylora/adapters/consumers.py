"""What an export tells the LoRA consumers (peft, vLLM, llama.cpp, lm-eval): where the base is, its tensors'
dtype, Conv1D targets, and an adapter_config.json every recent peft release reads.

adapter_config.json is written from a fixed list of LoraConfig fields rather than with
LoraConfig.save_pretrained: that writes every field of the installed peft, and older releases refuse a
config with a key they do not know (peft <= 0.13 raises TypeError on e.g. `alora_invocation_tokens`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# LoraConfig fields of peft 0.6.2, the oldest release checked to load exports (0.6 brought rank_pattern);
# every later release has them all
PEFT_CONFIG_KEYS = ("alpha_pattern", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
                    "lora_alpha", "lora_dropout", "modules_to_save", "peft_type", "r", "rank_pattern",
                    "target_modules", "task_type")


def base_reference(base: Mapping) -> str | None:
    """base_model_name_or_path for a consumer: the hub id, or the absolute path of a local folder / .gguf file."""
    ref = base.get("source") or base.get("name")
    if not ref:
        return None
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else str(ref)


GGUF_CONFIG_DIR = "base_config"


def gguf_note(ref: str | None, config_written: bool) -> str | None:
    """How each consumer loads a GGUF base (None for any other base); `config_written`: the export holds
    GGUF_CONFIG_DIR/config.json."""
    if not ref or not ref.endswith(".gguf"):
        return None
    path = Path(ref)
    where = (f"EXPORT/{GGUF_CONFIG_DIR} (the base's config.json, read from the GGUF)" if config_written else
             "FOLDER holding the base's config.json")
    return (f"the base is the GGUF file {path}. transformers loads it with AutoModelForCausalLM.from_pretrained("
            f"'{path.parent}', gguf_file='{path.name}'); peft's AutoPeftModelForCausalLM cannot (it passes the .gguf "
            "path to from_pretrained): load the base that way and call PeftModel.from_pretrained(base, EXPORT). "
            f"llama.cpp's convert_lora_to_gguf.py needs --base {where} or --base-model-id HUB_ID")


def with_architecture(cfg):
    """`cfg` with `architectures` set to its causal-LM class (a GGUF's config lacks it; llama.cpp's converter
    reads it), or None when there is no config or no such class."""
    if cfg is None:
        return None
    from transformers import AutoModelForCausalLM

    try:
        cfg.architectures = [AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    except KeyError:
        return None
    return cfg


def default_dtype(base: Mapping) -> str:
    """bf16 when the base computed in bf16 during training (CUDA), else fp32 (CPU, or not recorded)."""
    return "bf16" if base.get("compute_dtype") == "bfloat16" else "fp32"


def check_dtype(dtype: str | None, base: Mapping) -> str:
    """The export dtype's name: as given (fp32, bf16, fp16) or the base's default."""
    if dtype is None:
        return default_dtype(base)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return dtype


def cast_tensors(tensors: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """`tensors` in `dtype`; refuses values that overflow it (fp16 tops out at 65504)."""
    out = {k: t.to(DTYPES[dtype]).contiguous() for k, t in tensors.items()}
    for k, t in out.items():
        if not torch.isfinite(t).all():
            raise ConfigError(f"--dtype {dtype}: {k} holds values beyond {dtype}'s range; export with --dtype bf16 "
                              "or fp32")
    return out


def base_config(ref: str | None):
    """The base's transformers config (a folder, hub id or .gguf file), or None when it cannot be read here."""
    if not ref:
        return None
    from transformers import AutoConfig

    path = Path(ref)
    try:
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(ref)
    except Exception:  # a base not available here (another machine, remote code): the export works without it
        return None


def conv1d_suffixes(cfg) -> set[str]:
    """Module-name suffixes that are transformers Conv1D in a model of config `cfg` (GPT-2 and kin)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    cls = AutoModelForCausalLM._model_mapping.get(type(cfg), None) if cfg is not None else None
    if cls is None or not hasattr(sys.modules[cls.__module__], "Conv1D"):
        return set()  # unknown, or its modelling code does not use Conv1D: no need to build it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, Conv1D)}


def peft_config_dict(ref: str | None, alpha: float, r: int, targets: list[str], rank_pattern: Mapping[str, int],
                     fan_in_fan_out: bool) -> dict:
    """adapter_config.json's content: peft 0.6.2's LoraConfig fields only, target_modules sorted."""
    cfg = {"alpha_pattern": {}, "base_model_name_or_path": ref, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
           "inference_mode": True, "lora_alpha": alpha, "lora_dropout": 0.0, "modules_to_save": None,
           "peft_type": "LORA", "r": r, "rank_pattern": dict(sorted(rank_pattern.items())),
           "target_modules": sorted(targets), "task_type": "CAUSAL_LM"}
    assert tuple(cfg) == PEFT_CONFIG_KEYS
    return cfg


def write_peft_config(folder: Path, cfg: dict) -> None:
    """adapter_config.json, byte for byte the same for the same content."""
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
