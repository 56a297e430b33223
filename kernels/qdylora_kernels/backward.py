"""Backward kernels for the input gradient: dx = dy @ deq(W) + (s_m * mask_m(dy @ B)) @ A.

The weight is decoded again tile by tile (it is never saved or materialised); dA and dB are
small dense matmuls done by the caller with cuBLAS. Two shapes, as in the forward:
- `fused_dx` (M > SMALL_M): tiled GEMM over the N reduction, with the low-rank term
  g = dy @ B (computed once by the caller) expanded in the epilogue;
- `splitn_dx` (M <= SMALL_M): the N reduction is cut into slices, partial sums go to an fp32
  workspace with atomics, the programs past the last column tile compute g = dy @ B the
  same way, and a finalize kernel adds the low-rank term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, SMALL_M, dot_precision, grouped_tile, rank_block, split_count
from .nf4 import QBLOCK, NF4Weight, nf4_absmax, nf4_decode, nf4_row_ptrs, nf4_table


@triton.jit
def _lora_dx(
    acc, g_ptr, stride_gm, rm, ranks_ptr, alpha, a_ptr, stride_am, rk, M, K, R,
    BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """acc[m, k] += sum_{j < rank_m} (alpha / rank_m) * g[m, j] * A[j, k]; g fp32 or the dtype."""
    dtype = a_ptr.dtype.element_ty
    rank = tl.load(ranks_ptr + rm, mask=rm < M, other=1).to(tl.int32)
    scale = alpha / rank.to(tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rr[None, :], mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
        # round g to the dtype first, as the reference's dy @ B does
        gs = tl.where(rr[None, :] < rank[:, None], g.to(dtype).to(tl.float32) * scale[:, None], 0.0).to(dtype)
        a = tl.load(a_ptr + rr[:, None] * stride_am + rk[None, :], mask=(rr < R)[:, None] & (rk < K)[None, :], other=0.0)
        acc = tl.dot(gs, a, acc, input_precision=DOT_PREC)
    return acc


# --------------------------------------------------------------------------------------------
# M > SMALL_M: one fused GEMM


@triton.jit
def _dx_kernel(
    dy_ptr, g_ptr, ranks_ptr, a_ptr, dx_ptr,
    packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr,
    M, N, K, R, alpha,
    stride_dym, stride_gm, stride_am, stride_dxm,
    NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, LUT_ASM: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr,
):
    dtype = dy_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K  # BLOCK_K divides K: no column masks
    rk = k0 + tl.arange(0, BLOCK_K)
    rn0 = tl.arange(0, BLOCK_N)
    offset = tl.load(offset_ptr)
    table = nf4_table(code_ptr, BLOCK_N)
    w_ptrs = nf4_row_ptrs(packed_ptr, rn0, K, BLOCK_K) + k0 // 8
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + rn0[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    packed = tl.load(w_ptrs, mask=(rn0 < N)[:, None], other=0)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + rn0
        rmask = rn < N
        # next rows' weight bytes first, so their latency hides behind this tile's work
        packed_next = tl.load(w_ptrs + (n0 + BLOCK_N) * (K // 8), mask=(rn + BLOCK_N < N)[:, None], other=0)
        am = nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rn, rmask, k0, K, BLOCK_K, NESTED, BLOCKSIZE2)
        # W[n0:n0+BLOCK_N, k0:k0+BLOCK_K] is already the [reduction, output] operand
        w = nf4_decode(packed, am, table, BLOCK_N, BLOCK_K, dtype, LUT_ASM)
        dy = tl.load(dy_ptrs + n0, mask=(rm < M)[:, None] & rmask[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PREC)
        packed = packed_next

    if HAS_LORA:
        acc = _lora_dx(acc, g_ptr, stride_gm, rm, ranks_ptr, alpha, a_ptr, stride_am, rk, M, K, R, BLOCK_R, DOT_PREC)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=(rm < M)[:, None])


def _dx_config(M: int, K: int, dtype: torch.dtype) -> tuple[dict, int, int]:
    """(meta-parameters, num_warps, num_stages) for the fused dx GEMM.

    dy is wgmma's A operand, the decoded weight tile its B operand; as in the forward, large
    M takes a 256-row dy tile so each decoded weight feeds 256 multiply-adds.
    """
    # BLOCK_K output columns: two NF4 blocks per weight row where K allows
    block_k = 2 * QBLOCK if K % (2 * QBLOCK) == 0 else QBLOCK
    if INTERPRET:
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_K=block_k, BLOCK_N=32, GROUP_M=2), 4, 1
    if dtype == torch.float32:  # exact fp32 dots run on the FMA units: small tiles, no spills
        return dict(BLOCK_M=32, BLOCK_K=QBLOCK, BLOCK_N=32, GROUP_M=8), 4, 2
    if M >= 2048:
        return dict(BLOCK_M=256, BLOCK_K=block_k, BLOCK_N=64, GROUP_M=8), 8, 3
    if M > 256:
        return dict(BLOCK_M=128, BLOCK_K=block_k, BLOCK_N=64, GROUP_M=8), 8, 4
    return dict(BLOCK_M=64, BLOCK_K=block_k, BLOCK_N=64, GROUP_M=8), 4, 4


def fused_dx(dy, g, ranks, A, w: NF4Weight, alpha: float, with_lora: bool) -> torch.Tensor:
    """dx [M, K] in dy.dtype; g = dy @ B [M, R]; the low-rank term only when with_lora."""
    M, N = dy.shape
    K, R = w.K, A.shape[0]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    meta, num_warps, num_stages = _dx_config(M, K, dy.dtype)
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _dx_kernel[grid](
        dy, g, ranks, A, dx, *w.args(),
        M, N, K, R, float(alpha),
        dy.stride(0), g.stride(0), A.stride(0), dx.stride(0),
        **w.meta(dy.dtype), HAS_LORA=with_lora, BLOCK_R=rank_block(R), DOT_PREC=dot_precision(dy.dtype),
        num_warps=num_warps, num_stages=num_stages, **meta,
    )
    return dx


# --------------------------------------------------------------------------------------------
# M <= SMALL_M: split the N reduction, then a finalize


@triton.jit
def _dx_splitn_kernel(
    dy_ptr, b_ptr, ws_ptr,
    packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr,
    M, N, K, R, n_per_split,
    stride_dym, stride_bn, stride_ws,
    NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, LUT_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Program (j, s) adds slice s of the N reduction of dy @ W[:, tile j] into ws[:, :K]; the
    programs past the last column tile add dy @ B into ws[:, K:K+R] the same way."""
    dtype = dy_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    n_lo = tl.program_id(1) * n_per_split  # n_per_split % BLOCK_N == 0: slices never overlap
    n_hi = tl.minimum(n_lo + n_per_split, N)
    rm = tl.arange(0, BLOCK_M)
    rn0 = tl.arange(0, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_K)
    if pid_k < num_k:
        k0 = pid_k * BLOCK_K  # BLOCK_K divides K: no column masks
        rk = k0 + tl.arange(0, BLOCK_K)
        offset = tl.load(offset_ptr)
        table = nf4_table(code_ptr, BLOCK_N)
        w_ptrs = nf4_row_ptrs(packed_ptr, rn0, K, BLOCK_K) + k0 // 8
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        packed = tl.load(w_ptrs + n_lo * (K // 8), mask=(n_lo + rn0 < n_hi)[:, None], other=0)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            rn = n0 + rn0
            rmask = rn < N
            # the weight bytes are the stream this kernel is bound by: request the next
            # rows' before decoding these
            packed_next = tl.load(w_ptrs + (n0 + BLOCK_N) * (K // 8), mask=(rn + BLOCK_N < n_hi)[:, None], other=0)
            am = nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rn, rmask, k0, K, BLOCK_K, NESTED, BLOCKSIZE2)
            w = nf4_decode(packed, am, table, BLOCK_N, BLOCK_K, dtype, LUT_ASM)
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :], mask=(rm < M)[:, None] & rmask[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PREC)
            packed = packed_next
        tl.atomic_add(ws_ptr + rm[:, None] * stride_ws + rk[None, :], acc, mask=(rm < M)[:, None], sem="relaxed")
    else:
        rr = (pid_k - num_k) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            rn = n0 + rn0
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :], mask=(rm < M)[:, None] & (rn < N)[None, :], other=0.0)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=(rn < N)[:, None] & (rr < R)[None, :], other=0.0)
            acc_g = tl.dot(dy, b.to(dtype), acc_g, input_precision=DOT_PREC)
        tl.atomic_add(ws_ptr + rm[:, None] * stride_ws + K + rr[None, :], acc_g,
                      mask=(rm < M)[:, None] & (rr < R)[None, :], sem="relaxed")


@triton.jit
def _dx_finalize_kernel(
    ws_ptr, ranks_ptr, a_ptr, dx_ptr, dxl_ptr,
    M, K, R, alpha, stride_ws, stride_am, stride_dxm, stride_dxlm,
    SEPARATE_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dx = ws[:, :K] + lora, or (dx, dxl) = (ws[:, :K], lora) when x_lora is a separate input;
    lora = (s * mask * ws[:, K:K+R]) @ A."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    base = tl.load(ws_ptr + rm[:, None] * stride_ws + rk[None, :], mask=mask, other=0.0)
    if SEPARATE_LORA:
        lora = _lora_dx(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), ws_ptr + K, stride_ws, rm, ranks_ptr, alpha,
                        a_ptr, stride_am, rk, M, K, R, BLOCK_R, DOT_PREC)
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], base.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dxl_ptr + rm[:, None] * stride_dxlm + rk[None, :], lora.to(dxl_ptr.dtype.element_ty), mask=mask)
    else:
        acc = _lora_dx(base, ws_ptr + K, stride_ws, rm, ranks_ptr, alpha, a_ptr, stride_am, rk, M, K, R, BLOCK_R, DOT_PREC)
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


def splitn_dx(dy, A, B, ranks, w: NF4Weight, alpha: float, separate_lora: bool):
    """(dx, dxl or None, g = dy @ B in fp32 [M, R]) for M <= SMALL_M; A, B in dy.dtype.

    With separate_lora, dx is the base term only and dxl the low-rank one (x_lora given)."""
    M, N = dy.shape
    K, R = w.K, A.shape[0]
    assert M <= SMALL_M
    block_m = max(16, triton.next_power_of_2(M))
    # 128 output columns = two NF4 blocks per weight row and step where K allows: more weight
    # bytes in flight per program
    block_k = 2 * QBLOCK if K % (2 * QBLOCK) == 0 else QBLOCK
    block_n, num_warps, num_stages, fin_k = 64, 4, 4, 128
    if INTERPRET:
        block_n, num_stages, fin_k = 32, 1, 64
    elif dy.dtype == torch.float32:  # exact fp32 dots run on the FMA units: small tiles, no spills
        block_k, block_n, num_stages, fin_k = QBLOCK, 32, 2, 32
    block_r = 16
    steps = triton.cdiv(N, block_n)
    tiles = triton.cdiv(K, block_k) + triton.cdiv(R, block_r)
    splits = split_count(tiles, steps, M, dy.device)
    n_per_split = triton.cdiv(steps, splits) * block_n
    splits = triton.cdiv(N, n_per_split)
    ws = torch.zeros((M, K + R), dtype=torch.float32, device=dy.device)
    prec = dot_precision(dy.dtype)
    _dx_splitn_kernel[(tiles, splits)](
        dy, B, ws, *w.args(),
        M, N, K, R, n_per_split,
        dy.stride(0), B.stride(0), ws.stride(0),
        **w.meta(dy.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=block_r,
        DOT_PREC=prec, num_warps=num_warps, num_stages=num_stages,
    )
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    dxl = torch.empty_like(dx) if separate_lora else None
    _dx_finalize_kernel[(triton.cdiv(K, fin_k), triton.cdiv(M, block_m))](
        ws, ranks, A, dx, dxl if dxl is not None else dx,
        M, K, R, float(alpha), ws.stride(0), A.stride(0), dx.stride(0), dx.stride(0),
        SEPARATE_LORA=separate_lora, BLOCK_M=block_m, BLOCK_K=fin_k, BLOCK_R=rank_block(R),
        DOT_PREC=prec, num_warps=4,
    )
    return dx, dxl, ws[:, K:]
