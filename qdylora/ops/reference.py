"""Pure-PyTorch QDyLoRA linear: the CPU path, and what the Triton kernels' self-check compares with.

y = x @ deq(W)^T + s_m * (x_lora @ A[:r_m]^T) @ B[:, :r_m]^T + bias, with a rank r_m and scale
s_m = alpha / r_m per row m of x (x_lora: the low-rank path's input, x itself unless dropout makes
another; rank 0: the base alone). The dequantized weight lives only inside forward/backward
(recomputed in backward, never saved), like bitsandbytes' own 4-bit matmul.
"""

from __future__ import annotations

import torch
from bitsandbytes.functional import QuantState, dequantize_4bit
from qdylora_kernels.ranks import rank_masks


def dequantize_nf4(weight: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    """bitsandbytes' dequantization of a packed NF4 weight (bytes in any storage dtype) to [out, in]."""
    if weight.dtype != torch.uint8:  # bnb's quant_storage (bf16 for FSDP): the same bytes
        weight = weight.reshape(-1).view(torch.uint8).unsqueeze(1)
    return dequantize_4bit(weight, quant_state)


class ReferenceQDyLoRALinear(torch.autograd.Function):
    """Autograd op for the reference path; see qdylora_linear for the arguments."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, lora_A, lora_B, ranks, alpha, update, x_lora, observe=None):
        dtype = x.dtype
        W = dequantize_nf4(weight, quant_state).to(dtype)
        A, B = lora_A.to(dtype), lora_B.to(dtype)
        xl = x if x_lora is None else x_lora.to(dtype)
        fwd, grad = rank_masks(ranks, A.shape[0], alpha, update)
        h = xl @ A.t()
        y = x @ W.t() + (h * fwd.to(dtype)) @ B.t()
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x, xl if x_lora is not None else None, h, A, B, fwd, grad)
        # the packed weight is frozen storage, not an autograd input: keep a reference, not a copy
        ctx.weight, ctx.quant_state = weight, quant_state
        ctx.meta = (lora_A.dtype, lora_B.dtype, bias is not None, x_lora is not None)
        ctx.observe = observe
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xl, h, A, B, fwd, grad = ctx.saved_tensors
        a_dtype, b_dtype, has_bias, has_xl = ctx.meta
        if xl is None:
            xl = x
        dtype = dy.dtype
        dyB = dy @ B
        if ctx.observe is not None:
            ctx.observe(xl, dy, h, dyB)
        dx = dxl = dA = dB = dbias = None
        if ctx.needs_input_grad[0]:
            W = dequantize_nf4(ctx.weight, ctx.quant_state).to(dtype)
            dx = dy @ W
            lora_dx = (dyB * fwd.to(dtype)) @ A
            if has_xl:
                dxl = lora_dx
            else:
                dx = dx + lora_dx
        elif has_xl and ctx.needs_input_grad[9]:
            dxl = (dyB * fwd.to(dtype)) @ A
        if ctx.needs_input_grad[4]:
            dA = ((dyB * grad.to(dtype)).t() @ xl).to(a_dtype)
        if ctx.needs_input_grad[5]:
            dB = (dy.t() @ (h * grad.to(dtype))).to(b_dtype)
        if has_bias and ctx.needs_input_grad[3]:
            dbias = dy.sum(0)
        return dx, None, None, dbias, dA, dB, None, None, None, dxl, None
