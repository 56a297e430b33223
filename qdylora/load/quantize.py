"""Freeze a model's linears in bitsandbytes NF4 with double quantization (QLoRA storage), one layer at a time."""

from __future__ import annotations

import hashlib
import json

import bitsandbytes as bnb
import torch
from torch import nn
from tqdm import tqdm

NF4_BLOCKSIZE = 64  # QLoRA's storage: 64 weights per absmax, absmax quantized again in blocks of 256
NESTED_BLOCKSIZE = 256
# Kept in full precision, as QLoRA / BitsAndBytesConfig do: the output head and anything the user lists.
DEFAULT_SKIP_MODULES = ("lm_head", "embed_out", "output")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU (QLoRA's compute dtype), fp32 on CPU where bf16 matmuls are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2 and relatives): a linear whose weight is stored [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D or a bnb 4-bit linear."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def linear_weight(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The module's weight (or `weight`, a value for it) as [out, in]: a Conv1D's stored [in, out] transposed."""
    w = (module.weight if weight is None else weight).detach()
    return w.t() if is_conv1d(module) else w


def quantize_linear(linear: nn.Module, device: torch.device | str | None = None,
                    compute_dtype: torch.dtype | None = None) -> bnb.nn.Linear4bit:
    """Return a frozen bnb Linear4bit (NF4, blocksize 64, nested absmax) computing what `linear` computes.

    `linear` is an nn.Linear or a transformers Conv1D (quantized as the linear of its weight transposed).
    """
    device = torch.device(device) if device is not None else default_device()
    compute_dtype = compute_dtype or default_compute_dtype(device)
    in_f, out_f = linear_features(linear)
    q = bnb.nn.Linear4bit(
        in_f, out_f, bias=linear.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta",
    )
    w = linear_weight(linear).contiguous()
    if w.device.type == "meta":
        raise ValueError("cannot quantize a weight on the meta device; load its values first")
    q.weight = bnb.nn.Params4bit(
        w.to(device="cpu" if device.type != "cpu" and w.device.type == "cpu" else w.device),
        requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=NF4_BLOCKSIZE,
        quant_storage=torch.uint8,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)
    # Params4bit quantizes when moved to its device (bnb 0.50 quantizes on the CPU too)
    q = q.to(device)
    if not getattr(q.weight, "bnb_quantized", False):
        q.weight = q.weight._quantize(device) if hasattr(q.weight, "_quantize") else q.weight
    q.weight.requires_grad_(False)
    keep_standard_layout(q)
    return q


def quant_state_of(module: bnb.nn.Linear4bit):
    """The layer's QuantState: on its weight, or kept on the layer once FSDP replaced the weight by its shards."""
    qs = getattr(module.weight, "quant_state", None)
    return qs if qs is not None else getattr(module, "qdylora_quant_state", None)


def packed_nf4(module: bnb.nn.Linear4bit):
    """(packed weight, QuantState) in bitsandbytes' standard NF4 layout; the bytes may be stored as any dtype.

    On CPUs with AVX512-BF16, bnb's own inference forward repacks the weight into a CPU-only
    layout in place; undo that so our kernels and dequantization see the standard layout.
    """
    w = module.weight
    qs = quant_state_of(module)
    if getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
        qs = w.quant_state
    return w.data, qs


QUANT_STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float32": torch.float32}


def set_quant_storage(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every NF4 weight's packed bytes as `dtype` (bnb's quant_storage; the same bytes, viewed).

    FSDP shards and gathers parameters of one dtype per unit: bf16 storage in a bf16 model lets it
    shard the 4-bit weights like any other (the FSDP-QLoRA recipe).
    """
    for layer in quantized_linears(model).values():
        w = layer.weight
        nbytes = w.numel() * w.element_size()
        if nbytes % dtype.itemsize:
            raise ValueError(f"a packed weight of {nbytes} bytes cannot be stored as {dtype}")
        w.data = w.data.reshape(-1).view(torch.uint8).view(dtype).unsqueeze(1)
        w.quant_storage = dtype


def is_4bit_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (the only base DyLoRALinear wraps)."""
    return isinstance(module, bnb.nn.Linear4bit)


def is_plain_linear(module: nn.Module) -> bool:
    """A full-precision linear: nn.Linear or a subclass (Falcon's FalconLinear), or a Conv1D; not a bnb one."""
    if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
        return False
    return isinstance(module, nn.Linear) or is_conv1d(module)


def keep_standard_layout(module: bnb.nn.Linear4bit) -> None:
    """Stop bnb's CPU inference path from repacking the weight (it also computes in bf16 there)."""
    module.support_avx512bf16_for_cpu = False


def is_skipped(name: str, skip: tuple[str, ...] = DEFAULT_SKIP_MODULES) -> bool:
    """True when module `name` (or its last part) is one of `skip`: it stays in full precision."""
    return any(name == s or name.endswith("." + s) for s in skip)


def nf4_linear_names(model: nn.Module, skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES,
                     include_4bit: bool = True) -> list[str]:
    """Names of the linears stored in NF4: every linear but the skipped ones (the LM head), already 4-bit or not."""
    return [n for n, m in model.named_modules()
            if (is_plain_linear(m) or (include_4bit and is_4bit_linear(m))) and not is_skipped(n, skip_modules)]


def quantizable_linear_names(model: nn.Module, skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES) -> list[str]:
    """Names of the full-precision linears that become NF4."""
    return nf4_linear_names(model, skip_modules, include_4bit=False)


def quantize_model(model: nn.Module, device: torch.device | str | None = None,
                   compute_dtype: torch.dtype | None = None,
                   skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES) -> nn.Module:
    """Replace every linear (nn.Linear, Conv1D) but the skipped ones (LM head) by NF4 Linear4bit, one at a time."""
    device = torch.device(device) if device is not None else default_device()
    compute_dtype = compute_dtype or default_compute_dtype(device)
    names = quantizable_linear_names(model, skip_modules)
    for name in tqdm(names, desc="quantize", unit="linear", leave=False, disable=len(names) < 64):
        replace_module(model, name, quantize_linear(model.get_submodule(name), device, compute_dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    model.is_loaded_in_4bit = True  # what peft / transformers look at for a 4-bit model
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where submodule `name` was (the old one is freed once nothing else holds it)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantized_linears(model: nn.Module) -> dict[str, bnb.nn.Linear4bit]:
    """Name -> Linear4bit for every 4-bit linear in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def check_nf4_storage(module: bnb.nn.Linear4bit) -> None:
    """Raise ValueError unless the layer is NF4 with nested absmax at blocksize 64 / 256."""
    qs = quant_state_of(module)
    problems = []
    if qs is None:
        problems.append("no quant_state (not quantized)")
    else:
        if qs.quant_type != "nf4":
            problems.append(f"quant_type={qs.quant_type} (need nf4)")
        if qs.blocksize != NF4_BLOCKSIZE:
            problems.append(f"blocksize={qs.blocksize} (need {NF4_BLOCKSIZE})")
        if not qs.nested or qs.state2 is None:
            problems.append("absmax not double-quantized (need bnb_4bit_use_double_quant=True)")
        elif qs.state2.blocksize != NESTED_BLOCKSIZE:
            problems.append(f"nested blocksize={qs.state2.blocksize} (need {NESTED_BLOCKSIZE})")
    if problems:
        raise ValueError("4-bit layer is not QLoRA NF4 storage: " + "; ".join(problems) +
                         ". Re-quantize with quant_type='nf4', blocksize 64 and double quantization.")


def base_fingerprint(model: nn.Module) -> dict:
    """Identity of a quantized base: its name, and a hash of every 4-bit linear's name and shape."""
    # peft wraps each adapted linear as `<name>.base_layer`; the identity is the base's own name
    items = sorted((n.replace(".base_layer", ""), tuple(quant_state_of(m).shape))
                   for n, m in quantized_linears(model).items())
    digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    fp = {"name": str(name), "shapes_sha256": digest, "num_4bit_linears": len(items)}
    dtypes = {m.compute_dtype for m in quantized_linears(model).values()} - {None}
    if len(dtypes) == 1:  # what the base computes in (bf16 on CUDA, fp32 on the CPU): an export's default dtype
        fp["compute_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    source = getattr(model, "qdylora_source", None)
    if source:
        fp["source"] = str(source)  # what to pass as --model to load this base again
    return fp
