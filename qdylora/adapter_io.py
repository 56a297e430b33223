"""Adapters on disk: qdylora's own format (all r_max components) and export to a plain peft LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir
from .config import QDyLoRAConfig
from .layer import DyLoRALinear
from .model import _base_path, adapter_parameters, attach_adapters, dylora_layers
from .quantize import base_fingerprint

WEIGHTS_NAME = "qdylora_adapter.safetensors"
CONFIG_NAME = "qdylora_config.json"
EXPORT_META_NAME = "qdylora_export.json"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter folder is missing, malformed, or does not fit this base model."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The base transformers model under a PeftModel (for fingerprints)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_adapter(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write every DyLoRA layer's A [r_max, in] and B [out, r_max] + config, atomically."""
    params = adapter_parameters(model)
    if not params:
        raise AdapterError("the model has no qdylora adapters to save")
    cfg = dylora_layers(model)[0].qdylora_config
    tensors = {}
    for path, (A, B) in params.items():
        tensors[f"{path}.lora_A"] = A.float().contiguous().cpu()
        tensors[f"{path}.lora_B"] = B.float().contiguous().cpu()
    meta = {
        "format": "qdylora-adapter", "version": FORMAT_VERSION,
        "qdylora": cfg.to_dict(), "targets": sorted(params),
        "base_model": base_fingerprint(_unwrap(model)), **(extra or {}),
    }
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved adapter, with a clear error for a missing or broken folder."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterError(f"{d} is not a qdylora adapter folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                           "(written by `qdylora train` / qdylora.save_adapter)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path} is not valid JSON ({e}); the adapter folder is damaged") from e
    if meta.get("format") != "qdylora-adapter":
        raise AdapterError(f"{cfg_path} is not a qdylora adapter config (format={meta.get('format')!r})")
    return meta, load_file(str(w_path))


def check_base(meta: dict, model: nn.Module) -> None:
    """Refuse a base whose quantized linears differ from the one the adapter was trained on."""
    want, have = meta["base_model"], base_fingerprint(_unwrap(model))
    if want["shapes_sha256"] != have["shapes_sha256"]:
        raise AdapterError(
            f"this adapter was trained on base '{want['name']}' ({want['num_4bit_linears']} 4-bit linears, "
            f"fingerprint {want['shapes_sha256']}) but the model given is '{have['name']}' "
            f"({have['num_4bit_linears']} 4-bit linears, fingerprint {have['shapes_sha256']}); "
            "load the adapter on the base model it was trained with"
        )


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach (if needed) and fill DyLoRA adapters from `directory`; returns the PeftModel."""
    meta, tensors = read_adapter(directory)
    check_base(meta, model)
    cfg = QDyLoRAConfig.from_dict(meta["qdylora"])
    if not dylora_layers(model):
        cfg.target_modules = list(meta["targets"])
        model = attach_adapters(model, cfg)
    load_adapter_weights(model, tensors)
    return model


@torch.no_grad()
def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy A/B tensors (qdylora layout) into the model's DyLoRA layers, exactly."""
    seen = set()
    for name, m in model.named_modules():
        if not isinstance(m, DyLoRALinear):
            continue
        path = _base_path(name)
        try:
            A, B = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]
        except KeyError:
            raise AdapterError(f"the adapter has no weights for layer {path}; it was trained with other targets")
        try:
            m.set_factors(A, B)
        except ValueError as e:
            raise AdapterError(f"layer {path}: {e}") from None
        seen.update({f"{path}.lora_A", f"{path}.lora_B"})
    extra = sorted(set(tensors) - seen)
    if extra:
        raise AdapterError(f"the adapter has weights for {len(extra)} tensors this model lacks (e.g. {extra[0]})")


def _peft_target_names(paths: list[str]) -> list[str]:
    """Suffix names, as LoRA consumers expect; a same-named module that was not adapted gets peft's B = 0."""
    return sorted({p.rpartition(".")[2] for p in paths})


def export_peft(adapter_dir: str | os.PathLike, rank: int, output: str | os.PathLike,
                overwrite: bool = False) -> Path:
    """Write a plain peft LoRA adapter of rank `rank` (A[:rank], B[:, :rank], lora_alpha = alpha)."""
    from peft import LoraConfig

    meta, tensors = read_adapter(adapter_dir)
    cfg = QDyLoRAConfig.from_dict(meta["qdylora"])
    rank = cfg.check_rank(rank)
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} already exists and is not empty; choose another --output or pass --overwrite")
    targets = list(meta["targets"])
    peft_tensors = {}
    for path in targets:
        A, B = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]
        peft_tensors[f"base_model.model.{path}.lora_A.weight"] = A[:rank].contiguous()
        peft_tensors[f"base_model.model.{path}.lora_B.weight"] = B[:, :rank].contiguous()
    names = _peft_target_names(targets)
    lora = LoraConfig(r=rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=names,
                      bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=meta["base_model"].get("name"))
    with atomic_dir(output) as tmp:
        lora.save_pretrained(str(tmp))
        save_file(peft_tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / EXPORT_META_NAME).write_text(json.dumps(
            {"exported_rank": rank, "scale": cfg.alpha / rank, "source": str(Path(adapter_dir).resolve()),
             "qdylora": meta["qdylora"], "base_model": meta["base_model"]}, indent=2))
    return output
