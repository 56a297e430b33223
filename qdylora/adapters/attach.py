"""Attach DyLoRA adapters to a 4-bit model through peft, and switch their rank."""

from __future__ import annotations

import warnings
from typing import Iterable, Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..errors import ConfigError
from ..load.quantize import is_4bit_linear, nf4_linear_names
from .config import DEFAULT_TARGET_MODULES, QDyLoRAConfig
from .layer import DyLoRALinear


def resolve_targets(model: nn.Module, targets: Iterable[str] | None) -> list[str]:
    """Full names of the 4-bit linears matched by `targets` (suffix names); a clear error if any matches nothing."""
    names = nf4_linear_names(model)
    explicit = targets is not None
    wanted = list(targets) if explicit else list(DEFAULT_TARGET_MODULES)
    if explicit and list(wanted) == ["all-linear"]:
        wanted = sorted({n.rpartition(".")[2] for n in names})
    matches = {t: [n for n in names if n == t or n.endswith("." + t)] for t in wanted}
    available = sorted({n.rpartition(".")[2] for n in names})
    missing = [t for t, m in matches.items() if not m]
    if (explicit and missing) or not any(matches.values()):
        raise ConfigError(
            f"target module(s) {missing or wanted} match no linear layer of this model. "
            f"Linears that exist: {', '.join(available) or 'none'}; pass some of these (or 'all-linear')."
        )
    chosen = sorted({n for m in matches.values() for n in m})
    not_4bit = [n for n in chosen if not is_4bit_linear(model.get_submodule(n))]
    if not_4bit:
        raise ValueError(f"{len(not_4bit)} target linears (e.g. {not_4bit[0]}) are not 4-bit; "
                         "load the model with qdylora.load_quantized_model first")
    return chosen


def lora_config(config: QDyLoRAConfig, targets: list[str]) -> LoraConfig:
    """The peft LoraConfig that makes peft build DyLoRALinear layers (for get_peft_model or add_adapter)."""
    lora = LoraConfig(r=config.r_max, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    lora.qdylora = config  # read by DyLoRALinear.update_layer; not serialised by peft (we save our own config)
    lora._register_custom_module({nn.Module: DyLoRALinear})
    return lora


def attach_adapters(model: nn.Module, config: QDyLoRAConfig) -> PeftModel:
    """Wrap every target NF4 linear in a DyLoRALinear; returns a peft PeftModel (Trainer-ready)."""
    config.validate()
    with warnings.catch_warnings():
        # peft reads the model's is_gradient_checkpointing, which transformers 5 renamed (a FutureWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(config, resolve_targets(model, config.target_modules)))
    peft_model.qdylora_config = config
    return peft_model


def dylora_layers(model: nn.Module) -> list[DyLoRALinear]:
    """Every DyLoRA layer of the model, in module order."""
    return [m for m in model.modules() if isinstance(m, DyLoRALinear)]


def qdylora_config_of(model: nn.Module) -> QDyLoRAConfig:
    """The QDyLoRAConfig the model's adapters were built with."""
    layers = dylora_layers(model)
    if not layers:
        raise ValueError("this model has no qdylora adapters; call attach_adapters or load_adapter first")
    return layers[0].qdylora_config


def set_rank(model: nn.Module, rank: int | torch.Tensor | Mapping[str, int]) -> None:
    """Use rank `rank` in every DyLoRA layer: an int, a tensor with one rank per batch element, or a
    dict {module name (as in the base model): rank} where 0 switches a module's adapter off and the
    modules not named keep their rank."""
    cfg = qdylora_config_of(model)
    if isinstance(rank, Mapping):
        layers = module_layers(model)
        for name, r in check_module_ranks(rank, list(layers), cfg).items():
            layers[name].set_rank(r)
        return
    if isinstance(rank, torch.Tensor):
        for r in rank.reshape(-1).unique().tolist():
            cfg.check_rank(int(r))
    else:
        rank = cfg.check_rank(rank)
    for layer in dylora_layers(model):
        layer.set_rank(rank)


def module_layers(model: nn.Module) -> dict[str, DyLoRALinear]:
    """Module name (as in the base model) -> its DyLoRA layer, in module order."""
    return {base_module_name(n): m for n, m in model.named_modules() if isinstance(m, DyLoRALinear)}


def check_module_ranks(ranks: Mapping, names: Iterable[str], config: QDyLoRAConfig,
                       where: str = "the rank pattern", complete: bool = False) -> dict[str, int]:
    """{name: rank} checked against the adapted modules `names`: known names, ranks 0 or in [r_min, r_max],
    and with `complete` a rank for every module."""
    known = list(names)
    unknown = [n for n in ranks if n not in set(known)]
    if unknown:
        raise ConfigError(f"{where} names {len(unknown)} module(s) this adapter does not have (e.g. {unknown[0]!s}); "
                          f"use names as in the base model, e.g. {', '.join(known[:3])} ({len(known)} adapted in all)")
    out = {}
    for name, r in ranks.items():
        ok = isinstance(r, int) and not isinstance(r, bool) and (r == 0 or config.r_min <= r <= config.r_max)
        if not ok:
            raise ConfigError(f"{where}: rank {r!r} for {name} is outside {{0}} and [{config.r_min}, {config.r_max}]; "
                              f"use 0 (adapter off) or an integer between {config.r_min} and {config.r_max}")
        out[name] = r
    missing = [n for n in known if n not in out] if complete else []
    if missing:
        raise ConfigError(f"{where} gives no rank to {len(missing)} of the adapter's {len(known)} modules (e.g. "
                          f"{missing[0]}); give every module a rank (0 switches one off)")
    return out


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Force 'reference' or 'triton' (None: automatic) in every DyLoRA layer."""
    for layer in dylora_layers(model):
        layer.backend = backend


def adapted_module_names(model: nn.Module) -> list[str]:
    """Names (as in the base model) of the linears that carry DyLoRA adapters."""
    return [base_module_name(n) for n, m in model.named_modules() if isinstance(m, DyLoRALinear)]


def adapter_parameters(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path (as in the base model) -> (A [r_max, in], B [out, r_max]), detached copies."""
    return {base_module_name(name): m.factors() for name, m in model.named_modules() if isinstance(m, DyLoRALinear)}


def base_module_name(name: str) -> str:
    """Strip peft's wrapper prefix so names are those of the base model."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name
