"""Load a causal LM (hub id, folder, .gguf file or model object) and its tokenizer, with NF4 linears."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .embedded import default_model_path
from .quantize import (DEFAULT_SKIP_MODULES, check_nf4_storage, default_compute_dtype, default_device,
                       keep_standard_layout, quantize_model, quantized_linears)
from .heap import release_freed_memory, trim_heap
from .sharded import NotLayerByLayer, load_quantized_sharded
from .source import ModelSource, first_line, resolve_model

logger = logging.getLogger(__name__)


def _source(model: str | os.PathLike | ModelSource | None, gguf_file: str | None = None) -> ModelSource:
    if isinstance(model, ModelSource):
        return model
    model = str(model) if model is not None else default_model_path()
    return resolve_model(str(Path(model) / gguf_file) if gguf_file else model)


def load_tokenizer(model: str | ModelSource | None = None):
    """The model's tokenizer (GGUF-aware), with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    src = _source(model)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(src.pretrained_path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        found = [p.name for p in src.folder.glob("*") if p.name.startswith("tokenizer") or p.suffix == ".model"]
        why = first_line(e) if found or src.gguf_file else "no tokenizer.json, tokenizer_config.json or tokenizer.model"
        raise ModelLoadError(f"no tokenizer could be loaded from {src.source} ({why}); save the model's tokenizer "
                             "into its folder (tokenizer.save_pretrained(folder))") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(model: str | None = None, device: torch.device | str | None = None,
                             compute_dtype: torch.dtype | None = None):
    """(NF4-quantized causal LM, tokenizer) for a hub id, local folder or .gguf file (default: SmolLM2-135M)."""
    src = _source(model)
    tokenizer = load_tokenizer(src)  # first: it is quick, and a model without one should fail before loading
    m = load_quantized_model(src, device=device, compute_dtype=compute_dtype)
    m.qdylora_source = src.source
    return m, tokenizer


def load_quantized_model(model: str | os.PathLike | ModelSource | nn.Module, gguf_file: str | None = None,
                         device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
                         skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES) -> nn.Module:
    """A causal LM (hub id, local folder, GGUF file, or a model object) with NF4 linears.

    Safetensors checkpoints (a folder, or a hub id's snapshot) are quantized layer by layer as they
    are read, so RAM stays near the 4-bit size; GGUF files, .bin-only folders and checkpoints
    transformers must convert go through from_pretrained, then are quantized. Either way the model
    is the same: every floating tensor in `compute_dtype` (fp32 on the CPU, bf16 on CUDA) before
    quantization. A model that is already bnb 4-bit is checked and kept as it is.
    """
    device = torch.device(device) if device is not None else default_device()
    compute_dtype = compute_dtype or default_compute_dtype(device)
    release_freed_memory()  # else glibc keeps what loading and each training step free, growing with the model
    if isinstance(model, nn.Module):
        return _quantized(model, device, compute_dtype, skip_modules)
    src = _source(model, gguf_file)
    if src.safetensors:
        try:
            m = load_quantized_sharded(src.folder, device, compute_dtype, skip_modules, dtype=compute_dtype)
        except NotLayerByLayer as why:
            logger.warning("%s: %s; loading it whole through transformers (needs its full size in RAM)", src.name, why)
        else:
            m.config._name_or_path = src.name
            return m
    m = _from_pretrained(src, compute_dtype)
    m = _quantized(m, device, compute_dtype, skip_modules)
    m.config._name_or_path = src.name  # a GGUF file names the model; its folder is incidental
    return m


def _from_pretrained(src: ModelSource, dtype: torch.dtype) -> nn.Module:
    """transformers' from_pretrained for what the layer-by-layer loader does not read (GGUF, .bin, conversions)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "low_cpu_mem_usage": True}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        m = AutoModelForCausalLM.from_pretrained(src.pretrained_path, **kwargs)
    except (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise ModelLoadError(f"{src.source} could not be loaded ({first_line(e)}); re-save it with "
                             "save_pretrained (config.json + *.safetensors)") from None
    if src.gguf_file:
        # transformers dequantized the GGUF tensors on load; drop its GGUF marker so the model is
        # seen as what it now is (full precision, about to become NF4), which Trainer accepts
        m.hf_quantizer = None
        m.is_quantized = False
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
    return m


def _quantized(m: nn.Module, device: torch.device, compute_dtype: torch.dtype,
               skip_modules: tuple[str, ...]) -> nn.Module:
    """`m` with NF4 linears: quantized now, or checked and kept when it is already bnb 4-bit."""
    existing = quantized_linears(m)
    if existing:
        for layer in existing.values():
            check_nf4_storage(layer)
            keep_standard_layout(layer)
        for p in m.parameters():
            p.requires_grad_(False)
        return m
    m = quantize_model(m, device, compute_dtype, skip_modules)
    trim_heap()  # the full-precision linears are gone; give their memory back
    return m
