"""The QDyLoRA linear op and its backend choice (Triton on CUDA, PyTorch reference elsewhere).

The Triton path is used only for calls its kernels support (`qdylora_kernels.function.unsupported`)
and only after its self-check passed for that kernel variant (selfcheck.py); otherwise the call
takes the reference path, with a warning.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

import torch
from bitsandbytes.functional import QuantState

from qdylora_kernels.ranks import row_ranks

from ..errors import BackendError
from . import selfcheck
from .reference import ReferenceQDyLoRALinear

BACKENDS = ("auto", "reference", "triton")


@lru_cache(maxsize=1)
def _triton_impl():
    """The kernels' op module, or None when it cannot be imported here (no triton)."""
    try:
        from qdylora_kernels import function
    except Exception as e:  # triton missing or broken: the reference path still works
        warnings.warn(f"qdylora: Triton kernels unavailable ({e}); using the PyTorch reference path")
        return None
    return function


def _auto_backend(device: torch.device) -> str:
    """What 'auto' means on `device`."""
    return "triton" if device.type == "cuda" and _triton_impl() is not None else "reference"


def requested_backend(backend: str | None) -> str:
    """'auto', 'reference' or 'triton': the argument, else QDYLORA_BACKEND, else 'auto'."""
    choice = backend or "auto"
    if choice == "auto":
        choice = os.environ.get("QDYLORA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend {choice!r} is unknown; set QDYLORA_BACKEND to one of {', '.join(BACKENDS)}")
    return choice


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """'reference' or 'triton' for a tensor on `device`; QDYLORA_BACKEND overrides 'auto'."""
    return _resolve(requested_backend(backend), device)


def _resolve(choice: str, device: torch.device) -> str:
    if choice == "auto":
        choice = _auto_backend(device)
    if choice == "triton" and _triton_impl() is None:
        raise BackendError("QDYLORA_BACKEND=triton but the Triton kernels cannot be imported; install triton")
    return choice


def qdylora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: QuantState,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: int | torch.Tensor,
    alpha: float,
    update: str = "nested",
    x_lora: torch.Tensor | None = None,
    backend: str | None = None,
    observe=None,
) -> torch.Tensor:
    """x @ deq(W)^T + (alpha/r) * (x_lora @ A[:r]^T) @ B[:, :r]^T + bias, per-row ranks r.

    x: [..., in]; weight/quant_state: a bitsandbytes NF4 weight; lora_A: [R, in]; lora_B: [out, R]
    with R >= every rank; ranks: an int, or a tensor with one rank per row or per leading batch
    element; update: 'frozen' (only component r-1 of a row gets gradient), 'nested' (all < r) or 'even'
    (all < r, at the scale alpha/R for every row: rows weigh alike on shared components);
    x_lora: the input of the low-rank path when it differs from x (dropout); observe: None, or called once in
    backward as observe(x_lora, dy, h, dy @ B[:, :R]) with h = x_lora @ A[:R]^T, over the rows of x (fisher-train's
    statistics read the activations the op computes anyway).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xl2 = None if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])
    r = row_ranks(ranks, x2.shape[0], x.device)
    if backend is None and x2.shape[0] == 0:
        backend = "reference"
    choice = requested_backend(backend)
    impl = _resolve(choice, x.device)
    fn = ReferenceQDyLoRALinear.apply
    if impl == "triton":
        kernels = _triton_impl()
        reason = kernels.unsupported(x2, weight, quant_state, bias, lora_A, lora_B, r, xl2)
        if reason is None:
            # a failed self-check has already warned (or raised when strict): nothing more to say
            if selfcheck.check(kernels, x2, quant_state, bias, xl2, strict=choice == "triton") is None:
                fn = kernels.triton_qdylora_linear
        else:
            warnings.warn(f"qdylora: the Triton kernels cannot run this call ({reason}); using the PyTorch "
                          "reference path", stacklevel=2)
    y = fn(x2, weight, quant_state, bias, lora_A, lora_B, r, float(alpha), update, xl2, observe)
    return y.reshape(*lead, y.shape[-1])
