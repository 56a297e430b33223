"""Forward kernels: y = x @ deq(W)^T + s_m * mask_m(x_lora @ A^T) @ B^T + bias.

Two shapes of the same computation:
- `fused_forward` (M > SMALL_M): a tiled GEMM that decodes NF4 tiles in registers, with the
  low-rank expand and the bias fused in its epilogue. The shrink h = x_lora @ A^T is done once
  beforehand by the caller (one cuBLAS call, ~R/N of the work).
- `splitk_forward` (M <= SMALL_M, decoding): the weight read dominates, so the K reduction is
  cut into slices to keep every SM streaming, partial sums go to an fp32 workspace with
  atomics, and a small finalize kernel adds the low-rank path and the bias. The shrink rides
  along in the split kernel as a few extra programs.

Both compute the transposed tile acc[n, m] = W[n, :] . x[m, :]: the decoded weight is the
left operand, so on Hopper it can feed wgmma straight from registers, and a few rows of x
still fill the instruction (wgmma's N can be 8..256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, SMALL_M, dot_precision, grouped_tile, rank_block, split_count
from .nf4 import QBLOCK, NF4Weight, nf4_absmax, nf4_decode, nf4_row_ptrs, nf4_table


@triton.jit
def _lora_expand(
    acc, h_ptr, stride_hm, rm, ranks_ptr, alpha, b_ptr, stride_bn, rn, M, N, R,
    BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """acc[n, m] += sum_{k < rank_m} B[n, k] * (alpha / rank_m) * h[m, k]; h may be fp32 or the dtype.

    The rank is a runtime value per row: components >= rank_m are masked inside the padded
    BLOCK_R tile, so any rank runs through the same compiled kernel.
    """
    dtype = b_ptr.dtype.element_ty
    rank = tl.load(ranks_ptr + rm, mask=rm < M, other=1).to(tl.int32)
    scale = alpha / rank.to(tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :], mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
        # round h to the compute dtype first, as the reference's x @ A^T does
        hs = tl.where(rr[None, :] < rank[:, None], h.to(dtype).to(tl.float32) * scale[:, None], 0.0).to(dtype)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=(rn < N)[:, None] & (rr < R)[None, :], other=0.0)
        acc = tl.dot(b, tl.trans(hs), acc, input_precision=DOT_PREC)
    return acc


# --------------------------------------------------------------------------------------------
# M > SMALL_M: one fused GEMM


@triton.jit
def _fwd_kernel(
    x_ptr, h_ptr, ranks_ptr, b_ptr, bias_ptr, y_ptr,
    packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr,
    M, N, K, R, alpha,
    stride_xm, stride_hm, stride_bn, stride_ym,
    NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, LUT_ASM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    # GROUP_N weight-row tiles walk the x tiles together: the decoded-weight work is the same
    # either way, this keeps both operands' reads inside L2
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rn < N
    offset = tl.load(offset_ptr)
    table = nf4_table(code_ptr, BLOCK_N)
    w_ptrs = nf4_row_ptrs(packed_ptr, rn, K, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    x_mask = (rm < M)[:, None]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    packed = tl.load(w_ptrs, mask=rmask[:, None], other=0)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides K: no column masks
        # next tile's weight bytes first, so their latency hides behind this tile's work (the
        # per-row form of the bound keeps the CPU interpreter happy; it is uniform per row)
        packed_next = tl.load(w_ptrs + (k0 + BLOCK_K) // 8, mask=(rmask & (0 * rn + k0 + BLOCK_K < K))[:, None], other=0)
        am = nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rn, rmask, k0, K, BLOCK_K, NESTED, BLOCKSIZE2)
        w = nf4_decode(packed, am, table, BLOCK_N, BLOCK_K, dtype, LUT_ASM)
        x = tl.load(x_ptrs + k0, mask=x_mask, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PREC)
        packed = packed_next

    acc = _lora_expand(acc, h_ptr, stride_hm, rm, ranks_ptr, alpha, b_ptr, stride_bn, rn, M, N, R, BLOCK_R, DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    y = tl.trans(acc).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=(rm < M)[:, None] & (rn < N)[None, :])


def _fwd_config(M: int, dtype: torch.dtype) -> tuple[dict, int, int]:
    """(meta-parameters, num_warps, num_stages) for the fused forward GEMM.

    Decoding bounds the loop: in bf16 the NF4 lookup is about 3 instructions per weight (lut.py),
    the whole compiled main loop 7.4 (BLOCK_M 64) to 10.5 (BLOCK_M 256) SASS instructions per
    decoded weight, x staging and MMA issue included (table in NOTES.md); each decoded
    weight feeds BLOCK_M multiply-adds, so large M takes the widest x tile wgmma allows (256)
    to keep the decode under the tensor-core time. BLOCK_N weight rows = 2 warpgroups x 64.
    """
    if INTERPRET:
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=32, GROUP_N=2), 4, 1
    if dtype == torch.float32:  # exact fp32 dots run on the FMA units: small tiles, no spills
        return dict(BLOCK_M=32, BLOCK_N=64, GROUP_N=8), 4, 2
    if M >= 2048:
        return dict(BLOCK_M=256, BLOCK_N=128, GROUP_N=8), 8, 3
    if M > 256:
        return dict(BLOCK_M=128, BLOCK_N=128, GROUP_N=8), 8, 4
    return dict(BLOCK_M=64, BLOCK_N=128, GROUP_N=8), 4, 4


def fused_forward(x, h, ranks, B, bias, w: NF4Weight, alpha: float) -> torch.Tensor:
    """y [M, N] in x.dtype; h = x_lora @ A^T [M, R] (any float dtype); B [N, R] in x.dtype."""
    M, K = x.shape
    N, R = w.N, B.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    meta, num_warps, num_stages = _fwd_config(M, x.dtype)
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fwd_kernel[grid](
        x, h, ranks, B, bias if bias is not None else y, y, *w.args(),
        M, N, K, R, float(alpha),
        x.stride(0), h.stride(0), B.stride(0), y.stride(0),
        **w.meta(x.dtype), HAS_BIAS=bias is not None, BLOCK_K=QBLOCK, BLOCK_R=rank_block(R),
        DOT_PREC=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages, **meta,
    )
    return y


# --------------------------------------------------------------------------------------------
# M <= SMALL_M: split-K over the weight, then a finalize


@triton.jit
def _fwd_splitk_kernel(
    x_ptr, xl_ptr, a_ptr, ws_ptr,
    packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr,
    M, N, K, R, k_per_split,
    stride_xm, stride_xlm, stride_am, stride_ws,
    NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, LUT_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Program (i, s) adds its K slice s of x @ W[tile i]^T into ws[:, :N]; the programs past
    the last weight tile do the shrink x_lora @ A^T into ws[:, N:N+R] the same way."""
    dtype = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    k_lo = tl.program_id(1) * k_per_split  # k_per_split and K are multiples of BLOCK_K
    k_hi = tl.minimum(k_lo + k_per_split, K)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    if pid_n < num_n:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rn < N
        offset = tl.load(offset_ptr)
        table = nf4_table(code_ptr, BLOCK_N)
        w_ptrs = nf4_row_ptrs(packed_ptr, rn, K, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        packed = tl.load(w_ptrs + k_lo // 8, mask=rmask[:, None], other=0)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            # the weight bytes are the stream this kernel is bound by: request the next
            # tile's before decoding this one
            packed_next = tl.load(w_ptrs + (k0 + BLOCK_K) // 8, mask=(rmask & (0 * rn + k0 + BLOCK_K < k_hi))[:, None], other=0)
            am = nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rn, rmask, k0, K, BLOCK_K, NESTED, BLOCKSIZE2)
            w = nf4_decode(packed, am, table, BLOCK_N, BLOCK_K, dtype, LUT_ASM)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PREC)
            packed = packed_next
        tl.atomic_add(ws_ptr + rm[None, :] * stride_ws + rn[:, None], acc,
                      mask=rmask[:, None] & (rm < M)[None, :], sem="relaxed")
    else:
        ra = (pid_n - num_n) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc_h = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            a = tl.load(a_ptr + ra[:, None] * stride_am + (k0 + rk)[None, :], mask=(ra < R)[:, None], other=0.0)
            xl = tl.load(xl_ptr + rm[:, None] * stride_xlm + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
            acc_h = tl.dot(a.to(dtype), tl.trans(xl), acc_h, input_precision=DOT_PREC)
        tl.atomic_add(ws_ptr + rm[None, :] * stride_ws + N + ra[:, None], acc_h,
                      mask=(ra < R)[:, None] & (rm < M)[None, :], sem="relaxed")


@triton.jit
def _fwd_finalize_kernel(
    ws_ptr, ranks_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, R, alpha, stride_ws, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """y = ws[:, :N] + expand(ws[:, N:N+R]) + bias, cast to y's dtype."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    acc = tl.load(ws_ptr + rm[None, :] * stride_ws + rn[:, None], mask=mask, other=0.0)
    acc = _lora_expand(acc, ws_ptr + N, stride_ws, rm, ranks_ptr, alpha, b_ptr, stride_bn, rn, M, N, R, BLOCK_R, DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _splitk_config(M: int, K: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the split-K kernel and its finalize."""
    block_m = max(16, triton.next_power_of_2(M))
    # two NF4 blocks per row and step where K allows: more weight bytes in flight per program
    block_k = 2 * QBLOCK if K % (2 * QBLOCK) == 0 else QBLOCK
    if INTERPRET:
        return dict(block_m=block_m, block_n=32, block_k=block_k, fin_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # exact fp32 dots run on the FMA units: small tiles, no spills
        return dict(block_m=block_m, block_n=32, block_k=QBLOCK, fin_n=32, num_warps=4, num_stages=2)
    # 64 weight rows = one warpgroup's wgmma M; deep pipelining to keep bytes in flight
    return dict(block_m=block_m, block_n=64, block_k=block_k, fin_n=128, num_warps=4, num_stages=4)


def splitk_forward(x, xl, A, ranks, B, bias, w: NF4Weight, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], h = x_lora @ A^T [M, R] in fp32) for M <= SMALL_M; A, B in x.dtype."""
    M, K = x.shape
    N, R = w.N, A.shape[0]
    assert M <= SMALL_M
    cfg = _splitk_config(M, K, x.dtype)
    block_m, block_n, block_k = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    block_r = 16  # shrink programs handle 16 rows of A each: they read 4x the bytes per row of a weight tile
    steps = K // block_k
    tiles = triton.cdiv(N, block_n) + triton.cdiv(R, block_r)
    splits = split_count(tiles, steps, M, x.device)
    k_per_split = triton.cdiv(steps, splits) * block_k
    splits = triton.cdiv(K, k_per_split)
    # fp32 partial sums: [:, :N] for x @ W^T, [:, N:N+R] for h
    ws = torch.zeros((M, N + R), dtype=torch.float32, device=x.device)
    prec = dot_precision(x.dtype)
    _fwd_splitk_kernel[(tiles, splits)](
        x, xl, A, ws, *w.args(),
        M, N, K, R, k_per_split,
        x.stride(0), xl.stride(0), A.stride(0), ws.stride(0),
        **w.meta(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        DOT_PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    fin_n = cfg["fin_n"]
    _fwd_finalize_kernel[(triton.cdiv(N, fin_n), triton.cdiv(M, block_m))](
        ws, ranks, B, bias if bias is not None else y, y,
        M, N, R, float(alpha), ws.stride(0), B.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=fin_n, BLOCK_R=rank_block(R),
        DOT_PREC=prec, num_warps=4,
    )
    return y, ws[:, N:]
