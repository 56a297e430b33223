"""Load a causal LM (hub id, folder, .gguf file or model object) and its tokenizer, with NF4 linears."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .embedded import default_model_path
from .quantize import (DEFAULT_SKIP_MODULES, check_nf4_storage, default_compute_dtype, default_device,
                       keep_standard_layout, quantize_model, quantized_linears)


def split_gguf(model: str) -> tuple[str, str | None]:
    """(folder or id, gguf file name or None) for a model argument."""
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist")
        return str(p.parent), p.name
    return model, None


def load_tokenizer(model: str | None = None):
    """The model's tokenizer (GGUF-aware), with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    folder, gguf = split_gguf(model or default_model_path())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(model: str | None = None, device: torch.device | str | None = None):
    """(NF4-quantized causal LM, tokenizer) for a hub id, local folder or .gguf file (default: SmolLM2-135M)."""
    model = model or default_model_path()
    folder, gguf = split_gguf(model)
    m = load_quantized_model(folder, gguf_file=gguf, device=device)
    m.qdylora_source = str(Path(model).resolve()) if Path(model).exists() else model
    return m, load_tokenizer(model)


def load_quantized_model(model: str | os.PathLike | nn.Module, gguf_file: str | None = None,
                         device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
                         skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES) -> nn.Module:
    """A causal LM (hub id, local folder, GGUF file, or a model object) with NF4 linears.

    A model that is already bnb 4-bit is checked and kept as it is.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    compute_dtype = compute_dtype or default_compute_dtype(device)
    if isinstance(model, nn.Module):
        m = model
    else:
        path = Path(model)
        if path.is_file() and path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        kwargs = {"dtype": compute_dtype, "low_cpu_mem_usage": True}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        m = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else str(model), **kwargs)
    if gguf_file:
        # transformers dequantized the GGUF tensors on load; drop its GGUF marker so the model is
        # seen as what it now is (full precision, about to become NF4), which Trainer accepts
        m.hf_quantizer = None
        m.is_quantized = False
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
    existing = quantized_linears(m)
    if existing:
        for layer in existing.values():
            check_nf4_storage(layer)
            keep_standard_layout(layer)
        for p in m.parameters():
            p.requires_grad_(False)
        return m
    m = quantize_model(m, device, compute_dtype, skip_modules)
    if gguf_file and hasattr(m, "config"):
        m.config._name_or_path = str(gguf_file)  # the GGUF file names the model; its folder is incidental
    return m
