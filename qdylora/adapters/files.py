"""Adapters on disk in qdylora's own format: every r_max component, the config and the base's fingerprint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_dir
from ..errors import AdapterError
from ..load.quantize import base_fingerprint
from .attach import adapter_parameters, attach_adapters, base_module_name, dylora_layers
from .config import QDyLoRAConfig
from .layer import DyLoRALinear

WEIGHTS_NAME = "qdylora_adapter.safetensors"
CONFIG_NAME = "qdylora_config.json"
FORMAT_VERSION = 1


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
        path = base_module_name(name)
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
