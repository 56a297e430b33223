"""Adapters on disk in qdylora's own format: every r_max component, the config and the base's fingerprint."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_dir
from ..errors import AdapterError, ConfigError
from ..load.quantize import base_fingerprint
from .attach import adapter_parameters, attach_adapters, base_module_name, dylora_layers
from .config import QDyLoRAConfig
from .layer import DyLoRALinear

WEIGHTS_NAME = "qdylora_adapter.safetensors"
CONFIG_NAME = "qdylora_config.json"
SORTED_KEY = "svd_sorted"  # metadata: the components are sorted by adapters.svd_sort
FORMAT_VERSION = 1
# a module path as transformers names it; anything else in a file is refused
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _unwrap(model: nn.Module) -> nn.Module:
    """The base transformers model under a PeftModel (for fingerprints)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_adapter(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None,
                 params: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write every DyLoRA layer's A [r_max, in] and B [out, r_max] + config, atomically.

    `params`: the adapter_parameters(model) gathered beforehand (under FSDP every process gathers, one writes);
    `files`: more safetensors files written into the same folder ({file name: tensors}).
    """
    params = adapter_parameters(model) if params is None else params
    if not params:
        raise AdapterError("the model has no qdylora adapters to save")
    cfg = dylora_layers(model)[0].qdylora_config
    tensors = {}
    for path, (A, B) in params.items():
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"layer {path} holds non-finite values (nan or inf): the training diverged, so no "
                               "adapter was saved; lower --lr and resume from the last checkpoint")
        tensors[f"{path}.lora_A"] = A.float().contiguous().cpu()
        tensors[f"{path}.lora_B"] = B.float().contiguous().cpu()
    meta = {
        "format": "qdylora-adapter", "version": FORMAT_VERSION,
        "qdylora": cfg.to_dict(), "targets": sorted(params),
        "base_model": base_fingerprint(_unwrap(model)), SORTED_KEY: dylora_layers(model)[0].svd_sorted,
        **(extra or {}),
    }
    return write_adapter(directory, meta, tensors, files)


def write_adapter(directory: str | os.PathLike, meta: dict, tensors: dict[str, torch.Tensor],
                  files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write an adapter folder (weights + config, and `files`: {file name: tensors}) from its metadata and tensors,
    atomically."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, more in (files or {}).items():
            save_file(more, str(tmp / name))
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _load_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); the adapter folder is damaged") from None
    except OSError as e:
        raise AdapterError(f"cannot read {path} ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} holds a {type(meta).__name__}, not a qdylora adapter config")
    return meta


def adapter_config(meta: dict, where: str = "the adapter") -> QDyLoRAConfig:
    """The QDyLoRAConfig recorded in an adapter's metadata (AdapterError when missing or invalid)."""
    raw = meta.get("qdylora")
    if not isinstance(raw, dict):
        raise AdapterError(f"{where} has no 'qdylora' settings in {CONFIG_NAME}; it was not written by qdylora "
                           "or is damaged")
    try:
        return QDyLoRAConfig.from_dict(raw)
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"{where}: its recorded settings are invalid ({e})") from None


def _check_tensors(meta: dict, tensors: dict[str, torch.Tensor], cfg: QDyLoRAConfig, where: str) -> None:
    targets = meta.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and MODULE_NAME.fullmatch(t)
                                                                 for t in targets):
        raise AdapterError(f"{where}: 'targets' in {CONFIG_NAME} must list module names such as "
                           "model.layers.0.self_attn.q_proj")
    want = {f"{t}.lora_{s}" for t in targets for s in "AB"}
    if set(tensors) != want:
        odd = sorted(set(tensors) ^ want)
        raise AdapterError(f"{where}: the weights file does not match its config ({len(odd)} tensors differ, e.g. "
                           f"{odd[0]}); the adapter folder is damaged")
    for t in targets:
        A, B = tensors[f"{t}.lora_A"], tensors[f"{t}.lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != cfg.r_max or B.shape[1] != cfg.r_max:
            raise AdapterError(f"{where}: layer {t} holds A{tuple(A.shape)} and B{tuple(B.shape)}, but the config says "
                               f"r_max={cfg.r_max} (A [r_max, in], B [out, r_max]); the adapter folder is damaged")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"{where}: layer {t} holds non-finite values (nan or inf): the training diverged; "
                               "use an earlier checkpoint or train again with a lower --lr")


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved adapter, checked: a clear AdapterError for a missing, damaged or inconsistent one."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterError(f"{d} is not a qdylora adapter folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                           "(written by `qdylora train` / qdylora.save_adapter)")
    meta = _load_json(cfg_path)
    if meta.get("format") != "qdylora-adapter":
        raise AdapterError(f"{cfg_path} is not a qdylora adapter config (format={meta.get('format')!r})")
    if not isinstance(meta.get("base_model"), dict) or "shapes_sha256" not in meta["base_model"]:
        raise AdapterError(f"{cfg_path} lacks the base model's fingerprint ('base_model'); the adapter folder is damaged")
    cfg = adapter_config(meta, str(d))
    if not isinstance(meta.get(SORTED_KEY, False), bool):
        raise AdapterError(f"{cfg_path}: '{SORTED_KEY}' must be true or false, not {meta[SORTED_KEY]!r}; the adapter "
                           "folder is damaged")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise AdapterError(f"{w_path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "the file is damaged or incomplete") from None
    _check_tensors(meta, tensors, cfg, str(d))
    return meta, tensors


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
    cfg = adapter_config(meta, str(directory))
    layers = dylora_layers(model)
    if not layers:
        cfg.target_modules = list(meta["targets"])
        model = attach_adapters(model, cfg)
    else:
        have = layers[0].qdylora_config
        differ = [f"{k} {getattr(have, k)!r} (adapter: {getattr(cfg, k)!r})" for k in ("r_min", "r_max", "alpha", "update")
                  if getattr(have, k) != getattr(cfg, k)]
        if differ:
            raise AdapterError(f"the model's adapters differ from {directory}: " + ", ".join(differ)
                               + "; load it onto the plain base model instead")
    load_adapter_weights(model, tensors)
    for layer in dylora_layers(model):
        layer.svd_sorted = svd_sorted_meta(meta)
    return model


def svd_sorted_meta(meta: dict) -> bool:
    """Whether a saved adapter's components are svd-sorted (rank b at alpha/r_max; absent: trained as they are)."""
    return meta.get(SORTED_KEY) is True


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
