"""The autograd op wiring the kernels: the signature and gradients of qdylora's reference op (qdylora.ops.reference)."""

from __future__ import annotations

import torch

from .backward import fused_dx, splitn_dx
from .common import INTERPRET, SMALL_M
from .forward import fused_forward, splitk_forward
from .nf4 import nf4_weight, unsupported_reason
from .ranks import rank_masks, row_ranks

UPDATES = ("frozen", "nested", "even")


def _forward(x, weight, quant_state, bias, lora_A, lora_B, ranks, alpha, update, x_lora, need_h=True):
    """(y, what backward needs): the forward kernels, with the inputs brought to the compute dtype."""
    if update not in UPDATES:
        raise ValueError(f"update={update!r}; use one of {', '.join(UPDATES)}")
    dtype = x.dtype
    w = nf4_weight(weight, quant_state)
    x = x.contiguous()
    A = lora_A.to(dtype).contiguous()
    B = lora_B.to(dtype).contiguous()
    xl = x if x_lora is None else x_lora.to(dtype).contiguous()
    r = ranks.to(device=x.device, dtype=torch.int64).contiguous()
    bias_c = None if bias is None else bias.contiguous()
    if x.shape[0] <= SMALL_M:
        y, h32 = splitk_forward(x, xl, A, r, B, bias_c, w, alpha)
        # the low-rank activations, rounded as the reference's x @ A^T
        h = h32.to(dtype) if need_h else None
    else:
        h = xl @ A.t()  # the shrink, once for all output tiles
        y = fused_forward(x, h, r, B, bias_c, w, alpha)
    return y, (x, xl, h, A, B, r, w)


class TritonQDyLoRALinear(torch.autograd.Function):
    """y = x @ deq(W)^T + (alpha/r_m) * (x_lora @ A[:r_m]^T) @ B[:, :r_m]^T + bias, per-row ranks r_m.

    Arguments as ReferenceQDyLoRALinear.apply: (x [M, K], weight, quant_state, bias [N] | None,
    lora_A [R, K], lora_B [N, R], ranks int64 [M], alpha, update, x_lora [M, K] | None).
    The packed weight is frozen storage: it gets no gradient and is decoded again in backward. observe: None, or
    called once in backward as observe(x_lora, dy, h, dy @ B) (h = x_lora @ A^T; [M, R] each).
    """

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, lora_A, lora_B, ranks, alpha, update, x_lora, observe=None):
        y, saved = _forward(x, weight, quant_state, bias, lora_A, lora_B, ranks, alpha, update, x_lora)
        x, xl, h, A, B, r, w = saved
        ctx.save_for_backward(x, xl if x_lora is not None else None, h, A, B, r)
        ctx.nf4 = w
        ctx.meta = (lora_A.dtype, lora_B.dtype, bias is not None, x_lora is not None, float(alpha), update)
        ctx.observe = observe
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xl, h, A, B, r = ctx.saved_tensors
        a_dtype, b_dtype, has_bias, has_xl, alpha, update = ctx.meta
        if xl is None:
            xl = x
        dtype = x.dtype
        dy = dy.to(dtype).contiguous()
        fwd, grad = rank_masks(r, A.shape[0], alpha, update)
        need_dx = ctx.needs_input_grad[0]
        need_dxl = has_xl and (need_dx or ctx.needs_input_grad[9])
        dx = dxl = dA = dB = dbias = None
        if need_dx and dy.shape[0] <= SMALL_M:
            dx, dxl, g32 = splitn_dx(dy, A, B, r, ctx.nf4, alpha, separate_lora=has_xl)
            g = g32.to(dtype)
        else:
            g = dy @ B  # [M, R], once for the dx epilogue and dA
            if need_dx:
                dx = fused_dx(dy, g, r, A, ctx.nf4, alpha, with_lora=not has_xl)
            if need_dxl:
                dxl = (g * fwd.to(dtype)) @ A
        if ctx.observe is not None:
            ctx.observe(xl, dy, h, g)
        if ctx.needs_input_grad[4]:
            dA = ((g * grad.to(dtype)).t() @ xl).to(a_dtype)
        if ctx.needs_input_grad[5]:
            dB = (dy.t() @ (h * grad.to(dtype))).to(b_dtype)
        if has_bias and ctx.needs_input_grad[3]:
            dbias = dy.sum(0)
        return dx, None, None, dbias, dA, dB, None, None, None, dxl, None


def unsupported(x, weight, quant_state, bias, lora_A, lora_B, ranks, x_lora=None) -> str | None:
    """Why the kernels cannot run this call (the caller then uses another backend), or None."""
    reason = unsupported_reason(x, weight, quant_state, bias, lora_A, lora_B, x_lora, INTERPRET)
    if reason is None and x.shape[0] == 0:
        reason = "x has no rows"
    return reason


def triton_qdylora_linear(x, weight, quant_state, bias, lora_A, lora_B, ranks, alpha, update="nested", x_lora=None,
                          observe=None):
    """The fused op for a call that `unsupported` accepts; ranks: an int, one per row or one per batch element."""
    if x.dim() == 2 and not (torch.is_tensor(ranks) and ranks.dim() == 1 and ranks.numel() == x.shape[0]):
        ranks = row_ranks(ranks, x.shape[0], x.device)
    args = (x, weight, quant_state, bias, lora_A, lora_B, ranks, alpha, update, x_lora)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B, x_lora))):
        # inference (decoding, eval): no autograd node, nothing kept for a backward
        return _forward(*args, need_h=False)[0]
    return TritonQDyLoRALinear.apply(*args, observe)
