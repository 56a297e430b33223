"""Quantize to NF4 while loading, one tensor at a time, so memory stays near the 4-bit size.

``load_quantized_sharded(folder)`` builds the model on the meta device from ``config.json``,
checks every shard's header (``model.safetensors.index.json`` + shards, or a single
``model.safetensors``), then reads one tensor at a time (:func:`qdylora.load.checkpoint.read_tensors`).
A linear's weight is quantized as soon as it (and its bias) has been read, bit-identical to
:func:`qdylora.load.quantize.quantize_linear`, and the full-precision copy is dropped at once;
every other tensor (embeddings, norms, the LM head) is placed on the target device. With
``dtype`` (what training passes: fp32 on the CPU, bf16 on CUDA) every floating tensor is converted
as ``from_pretrained(dtype=...)`` would, the linears before they are quantized, so the model is the
one from_pretrained + quantize_model gives.

Memory needed (P = parameters of the quantized linears, U = the other parameters, s = bytes per
value of ``dtype``):

- target device: the final model, about ``0.52 * P + s * U`` bytes, plus one linear's weight in
  full precision while it is quantized.
- CPU RAM when loading to a GPU: one tensor at a time (the largest: the embedding, or a linear).
- CPU RAM when loading to the CPU: the final model plus one tensor and the quantizer's scratch
  (~20 B per value of a 1M-value chunk); never the bf16 size of the whole model.

``quantize_random_init(config, device)`` does the same without a checkpoint: each linear gets
a random bf16 weight drawn directly on the device, is quantized and freed (for benchmarks of
models, such as Falcon-40B, whose weights are not at hand).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..errors import ModelLoadError
from .checkpoint import read_tensors, shard_plan, some_names
from .heap import release_freed_memory, trim_heap
from .quantize import (DEFAULT_SKIP_MODULES, NESTED_BLOCKSIZE, NF4_BLOCKSIZE, default_compute_dtype, linear_features,
                       linear_weight, quantizable_linear_names, quantize_linear, replace_module)

logger = logging.getLogger(__name__)


class NotLayerByLayer(Exception):
    """The checkpoint needs transformers' from_pretrained: it is pre-quantized, its weights are converted while
    loading (renamed or fused), or the model keeps modules in fp32. Raised before any weight is read."""


def build_meta_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of `config` with parameters on the meta device (buffers such as RoPE tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` by `value` (frozen)."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


# values per chunk when quantizing on the CPU: bitsandbytes quantizes there in plain PyTorch with ~20 B of
# scratch per value, and each call costs a few thread synchronisations; a quarter of the weight, within
# these bounds, keeps the scratch below a linear's own size and the calls few
CPU_CHUNK_MIN, CPU_CHUNK_MAX = 1 << 18, 1 << 22


def cpu_chunk_values(numel: int) -> int:
    """Values quantized per call for a weight of `numel` values."""
    return min(max(numel // 4, CPU_CHUNK_MIN), CPU_CHUNK_MAX)


def quantize_linear_chunked(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                            chunk_values: int | None = None, dtype: torch.dtype | None = None):
    """NF4 Linear4bit on the CPU, bit-identical to quantize_linear, quantized a few rows at a time.

    `weight` is [out, in]. `dtype` (default: the weight's) is the dtype quantize_linear would have seen:
    each chunk is converted on its own, so a bf16 weight quantized as fp32 never exists in fp32 whole.
    NF4 blocks (64 values) are independent, so the packed data and the first-level absmax of
    row chunks concatenate to those of the whole weight; the nested quantization of the absmax
    (offset = its mean, blocks of 256) is then done once on the whole absmax, as bitsandbytes does.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    dtype = dtype or weight.dtype
    out_f, in_f = weight.shape
    flat = weight.detach().contiguous().reshape(-1)
    n = flat.numel()
    step = max(NF4_BLOCKSIZE, (chunk_values or cpu_chunk_values(n)) // NF4_BLOCKSIZE * NF4_BLOCKSIZE)
    packed, absmax = [], []
    for start in range(0, n, step):
        q, st = F.quantize_4bit(flat[start:start + step].to(dtype), blocksize=NF4_BLOCKSIZE,
                                compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8)
        packed.append(q.reshape(-1))
        absmax.append(st.absmax)
    absmax_all = torch.cat(absmax)
    offset = absmax_all.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax_all - offset, blocksize=NESTED_BLOCKSIZE)
    state = F.QuantState(absmax=qabsmax, shape=weight.shape, dtype=dtype, blocksize=NF4_BLOCKSIZE,
                         code=F.get_4bit_type("nf4", device=weight.device), quant_type="nf4", offset=offset,
                         state2=state2)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.cat(packed).unsqueeze(1), requires_grad=False, quant_state=state,
                                     blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                                     quant_storage=torch.uint8, module=layer, bnb_quantized=True)
    layer.quant_state = state
    layer.support_avx512bf16_for_cpu = False  # as quantize_linear: keep bnb's standard layout on the CPU
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype).to(compute_dtype), requires_grad=False)
    return layer


def _quantize_from(model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None,
                   device: torch.device, compute_dtype: torch.dtype, chunk_values: int | None = None,
                   dtype: torch.dtype | None = None) -> None:
    """Quantize linear `name` from a value of its weight (stored layout) and bias; put the NF4 layer in its place.

    `dtype` converts the weight first, as from_pretrained(dtype=...) would have before quantize_linear.
    """
    old = model.get_submodule(name)
    weight = linear_weight(old, weight)  # [out, in], a Conv1D's transposed
    if device.type == "cpu" and weight.device.type == "cpu":
        replace_module(model, name, quantize_linear_chunked(weight, bias, compute_dtype, chunk_values, dtype))
        del weight, bias
        trim_heap()
        return
    if dtype is not None:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    lin = nn.Linear(*linear_features(old), bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    replace_module(model, name, quantize_linear(lin, device, compute_dtype))


def _head_names(model: nn.Module) -> set[str]:
    """Names under which the LM head's weight appears when the config ties it to the input embeddings."""
    head = model.get_output_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or getattr(head, "weight", None) is None:
        return set()
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight}


def _tie_or_check(model: nn.Module) -> None:
    """Tie the LM head to the embedding when the config says so (as transformers does); refuse missing weights."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if head is not None and embed is not None and getattr(head, "weight", None) is not None:
        stored = head.weight.device.type != "meta"
        # transformers ties a head the checkpoint leaves out or stores equal to the embedding, and keeps
        # one that differs (with a warning)
        if tied and (not stored or torch.equal(head.weight, embed.weight)):
            head.weight = embed.weight
        elif tied and stored:
            logger.warning("the config ties the LM head to the embeddings but the checkpoint stores a different "
                           "head; keeping both, as transformers does")
        elif not stored:
            raise ModelLoadError("the checkpoint has no LM head weight and the config does not tie it to the "
                                 "embeddings; the checkpoint is incomplete (re-save the model with save_pretrained)")
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise _not_in_checkpoint(left)


def _not_in_checkpoint(names: list[str]) -> ModelLoadError:
    return ModelLoadError(f"{some_names(names)} not in the checkpoint; the checkpoint does not match its "
                          "config.json (re-save the model with save_pretrained)")


def _blocker(model: nn.Module, dtype: torch.dtype | None) -> str | None:
    """Why transformers' from_pretrained must load this model (None: the layer-by-layer loader can)."""
    config = model.config
    if getattr(config, "quantization_config", None):
        return "the checkpoint is already quantized (its config has a quantization_config)"
    keeps_fp32 = getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)
    if keeps_fp32 and dtype in (torch.float16, torch.bfloat16):
        return f"{type(model).__name__} keeps some modules in fp32 when loaded in {dtype}"
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # an older transformers: it converts no weights
        return None
    if get_model_conversion_mapping(model, add_legacy=False):
        return f"transformers converts {config.model_type} weights while loading (renamed or fused)"
    return None


def _key_names(plan: dict[str, list[str]], model: nn.Module, params: dict) -> dict[str, str]:
    """Checkpoint key -> model tensor name for every key to load; raises before any weight is read when a
    parameter has no key (NotLayerByLayer when unknown keys suggest a renaming only transformers knows)."""
    names, unknown = {}, []
    for keys in plan.values():
        for key in keys:
            name = key if key in params else _match_key(key, params)
            if name is None:
                unknown.append(key)
            else:
                names[key] = name
    found = set(names.values()) | _head_names(model)  # a tied head may be absent: the embedding is the head
    missing = sorted(n for n, _ in model.named_parameters(remove_duplicate=False) if n not in found)
    if missing and unknown:
        raise NotLayerByLayer(f"checkpoint names such as {unknown[0]} differ from the model's ({missing[0]})")
    if missing:
        raise _not_in_checkpoint(missing)
    return names


def load_quantized_sharded(
    path_or_folder: str | os.PathLike,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A causal LM from a (sharded) safetensors folder, each linear quantized to NF4 as it is read.

    `dtype` converts every floating tensor, the linears' weights before they are quantized (what
    from_pretrained(dtype=...) followed by quantize_model gives); default: as stored. Raises
    NotLayerByLayer, before reading any weight, for checkpoints only from_pretrained can load, and
    ModelLoadError for a missing, corrupt or incomplete checkpoint. Peak memory: see the module docstring.
    """
    from transformers import AutoConfig

    folder = Path(path_or_folder)
    if folder.is_file():
        folder = folder.parent
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass the folder written by save_pretrained")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = compute_dtype or default_compute_dtype(device)
    release_freed_memory()
    config = AutoConfig.from_pretrained(str(folder))
    plan = shard_plan(folder)
    model = build_meta_model(config, dtype)
    why = _blocker(model, dtype)
    if why:
        raise NotLayerByLayer(why)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    names = _key_names(plan, model, params)
    targets = set(quantizable_linear_names(model, skip_modules))
    pending: dict[str, dict[str, torch.Tensor]] = {}  # linear -> the parts read so far
    bar = tqdm(total=len(targets), desc="load + quantize", unit="linear", leave=False,
               disable=len(targets) < 64)  # a tiny model loads in a blink: no bar
    for fname, keys in plan.items():
        # stray keys (old rotary caches ...) are not read: transformers ignores them too
        for key, t in read_tensors(folder / fname, [k for k in keys if k in names]):
            name = names[key]
            if device.type != "cpu":
                t = t.to(device)
            mod_name, _, attr = name.rpartition(".")
            if mod_name in targets and attr in ("weight", "bias"):
                parts = pending.setdefault(mod_name, {})
                parts[attr] = t
                lin = model.get_submodule(mod_name)
                if "weight" in parts and (lin.bias is None or "bias" in parts):
                    _quantize_from(model, mod_name, parts["weight"], parts.get("bias"), device, compute_dtype,
                                   dtype=dtype)
                    del pending[mod_name], parts, t  # drop the full-precision copy now
                    bar.update(1)
                continue
            _set_tensor(model, name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    bar.close()
    if pending:
        raise ModelLoadError(f"linears {sorted(pending)[:3]} are missing their weight in the checkpoint")
    _tie_or_check(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)  # buffers built on the CPU (RoPE tables)
    model.is_loaded_in_4bit = True
    model.config._name_or_path = str(folder)
    _load_generation_config(model, folder)
    model.eval()
    trim_heap()
    return model


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    """generation_config.json when the folder has one, as from_pretrained reads it (a bad one is ignored there too)."""
    if not (folder / "generation_config.json").is_file() or not getattr(model, "can_generate", lambda: False)():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        pass


def _match_key(key: str, params: dict) -> str | None:
    """Checkpoint key -> model name when they differ only by the base-model prefix."""
    for cand in (key.partition(".")[2], "model." + key, "transformer." + key):
        if cand in params:
            return cand
    return None


def quantize_random_init(
    config,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype = torch.bfloat16,
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES,
    seed: int = 0,
    std: float = 0.02,
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """A model of `config` with random weights, each linear drawn on `device` and quantized at once.

    Peak memory on the device: the final NF4 model plus one linear in `dtype`; CPU RAM stays small.
    `progress(done, total)` is called after each quantized linear.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = compute_dtype or default_compute_dtype(device)
    model = build_meta_model(config, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    names = quantizable_linear_names(model, skip_modules)
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        w = torch.randn(lin.weight.shape, generator=gen, device=device, dtype=dtype).mul_(std)  # stored layout
        b = torch.zeros(linear_features(lin)[1], device=device, dtype=dtype) if lin.bias is not None else None
        # on the CPU, large chunks: bitsandbytes' CPU quantizer costs ~0.1 s per call
        _quantize_from(model, name, w, b, device, compute_dtype, chunk_values=1 << 24)
        del w, b
        if progress is not None:
            progress(i + 1, len(names))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tie = bool(getattr(config, "tie_word_embeddings", False)) and head is not None and embed is not None
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta" or (tie and p is head.weight):
            continue
        if p.dim() == 1:  # norm scales 1, biases 0: a well-behaved random model
            value = torch.ones if name.endswith("weight") else torch.zeros
            t = value(p.shape, device=device, dtype=dtype)
        else:
            t = torch.randn(p.shape, generator=gen, device=device, dtype=dtype).mul_(std)
        _set_tensor(model, name, t)
    if tie and head.weight.device.type == "meta":
        head.weight = embed.weight
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    model.is_loaded_in_4bit = True
    return model


__all__ = ["load_quantized_sharded", "quantize_random_init", "build_meta_model", "quantize_linear_chunked",
           "NotLayerByLayer"]
