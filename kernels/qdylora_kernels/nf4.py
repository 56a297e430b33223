"""bitsandbytes' NF4 storage as the kernels read it, and the in-kernel decoder.

The layout is bitsandbytes' own, read as it is (no conversion, no second copy):
- `weight`: uint8 [N*K/2, 1], the row-major [N, K] weight flattened, two 4-bit codes per
  byte, element 2i in the HIGH nibble and element 2i+1 in the low one;
- one absmax per block of 64 consecutive elements of that flattened weight. With nested
  ("double") quantization it is stored as uint8 and decoded as
  `state2.code[absmax_u8[j]] * state2.absmax[j // state2.blocksize] + offset`;
  without it, it is fp32;
- value = `quant_state.code[nibble] * absmax[block]`, computed in fp32 (as
  `bitsandbytes.functional.dequantize_4bit` does) and rounded once to the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import INTERPRET
from .lut import LUT_CONSTRAINTS, lut_asm

QBLOCK = 64  # the only bitsandbytes blocksize the kernels read; others fall back to the reference
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class NF4Weight:
    """The tensors of one NF4 weight, as the kernels take them (all on the weight's device)."""

    packed: torch.Tensor  # int32 [N*K/8]: the packed bytes read 4 at a time
    absmax: torch.Tensor  # uint8 [N*K/64] when nested, else fp32
    code: torch.Tensor  # fp32 [16], the NF4 values
    code2: torch.Tensor  # fp32 [256], state2.code (a 1-element dummy when not nested)
    absmax2: torch.Tensor  # fp32, state2.absmax (dummy when not nested)
    offset: torch.Tensor  # fp32 [1] (0 when not nested)
    blocksize2: int  # state2.blocksize (1 when not nested)
    nested: bool
    N: int
    K: int

    def args(self) -> tuple:
        """The pointer arguments every kernel takes, in the order of their signatures."""
        return (self.packed, self.absmax, self.code, self.code2, self.absmax2, self.offset)

    def meta(self, dtype: torch.dtype) -> dict:
        """The matching constexprs, for tiles decoded to `dtype`."""
        return dict(NESTED=self.nested, BLOCKSIZE2=self.blocksize2, LUT_ASM=lut_for(dtype))


def lut_for(dtype: torch.dtype) -> str:
    """The LUT_ASM constexpr of nf4_decode for tiles in `dtype` (see lut.py)."""
    if INTERPRET or dtype not in (torch.bfloat16, torch.float16):
        return ""
    return lut_asm(dtype)


def unsupported_reason(x, weight, quant_state, bias, lora_A, lora_B, x_lora, interpret: bool) -> str | None:
    """Why the kernels cannot run this call (the caller then falls back to the reference), or None."""
    if not (x.is_cuda or interpret):
        return f"x is on {x.device}, the kernels need CUDA"
    if x.dim() != 2:
        return f"x must be 2-D [rows, in], got shape {tuple(x.shape)}"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x dtype {x.dtype} is not fp16/bf16/fp32"
    qs = quant_state
    if getattr(qs, "quant_type", None) != "nf4":
        return f"quant_type {getattr(qs, 'quant_type', None)!r} is not 'nf4'"
    if qs.blocksize != QBLOCK:
        return f"blocksize {qs.blocksize} is not {QBLOCK}"
    if qs.shape is None or len(qs.shape) != 2:
        return f"quant_state.shape {qs.shape} is not [out, in]"
    N, K = int(qs.shape[0]), int(qs.shape[1])
    if K % QBLOCK != 0:
        return f"in_features {K} is not a multiple of {QBLOCK}"
    # the packed bytes may be stored as any dtype (bnb's quant_storage: bf16 for FSDP); only the bytes count
    nbytes = weight.numel() * weight.element_size()
    if nbytes * 2 != N * K or (weight.dim() == 2 and weight.shape[0] == 1):
        return f"weight {tuple(weight.shape)} {weight.dtype} is not bitsandbytes' packed [N*K/2 bytes, 1] layout"
    if (weight.storage_offset() * weight.element_size()) % 4 != 0 or not weight.is_contiguous():
        return "the packed weight is not a contiguous, 4-byte aligned buffer"
    if N * K // 2 > INT32_MAX or x.numel() > INT32_MAX or x.shape[0] * N > INT32_MAX:
        return "tensors too large for the kernels' 32-bit offsets"
    if x.shape[1] != K:
        return f"x has {x.shape[1]} features, the weight {K}"
    if lora_A.dim() != 2 or lora_A.shape[1] != K or lora_B.dim() != 2 or lora_B.shape != (N, lora_A.shape[0]):
        return f"lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not match [R, {K}] / [{N}, R]"
    if bias is not None and bias.numel() != N:
        return f"bias has {bias.numel()} elements, expected {N}"
    if x_lora is not None and x_lora.shape != x.shape:
        return f"x_lora {tuple(x_lora.shape)} does not match x {tuple(x.shape)}"
    if qs.nested and qs.state2.absmax.dtype != torch.float32:
        return "state2.absmax is not fp32"
    for t in (weight, qs.absmax, lora_A, lora_B):
        if t.device != x.device:
            return f"tensors on different devices ({t.device} vs {x.device})"
    return None


def nf4_weight(weight: torch.Tensor, quant_state) -> NF4Weight:
    """Views of a bitsandbytes NF4 weight and its QuantState, ready to hand to the kernels."""
    qs = quant_state
    dev = weight.device
    N, K = int(qs.shape[0]), int(qs.shape[1])
    code = qs.code.to(device=dev, dtype=torch.float32).contiguous()
    if qs.nested:
        absmax = qs.absmax.contiguous()
        code2 = qs.state2.code.to(device=dev, dtype=torch.float32).contiguous()
        absmax2 = qs.state2.absmax.to(device=dev, dtype=torch.float32).contiguous()
        offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=dev).reshape(1)
        blocksize2 = int(qs.state2.blocksize)
    else:
        absmax = qs.absmax.to(torch.float32).contiguous()
        code2 = absmax2 = offset = torch.zeros(1, dtype=torch.float32, device=dev)
        blocksize2 = 1
    packed = weight.reshape(-1).view(torch.int32)
    return NF4Weight(packed, absmax, code, code2, absmax2, offset, blocksize2, qs.nested, N, K)


@triton.jit
def nf4_table(code_ptr, BR: tl.constexpr):
    """The 16 NF4 values broadcast to [BR, 16], loaded once per program (outside the K loop)."""
    return tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BR, 16))


@triton.jit
def nf4_row_ptrs(packed_ptr, rows, K, BK: tl.constexpr):
    """Pointers [BR, BK/8] to the packed words (4 bytes, 8 weights) of W[rows, 0:BK]; add k0 // 8
    to move along K.

    The loops load these tiles themselves, one tile ahead of the decode: Triton's pipeliner
    does not stage a load whose result reaches the dot only through the lookup, so the next
    tile's words are requested before this one is decoded. Every kernel picks BK dividing K
    (K % 64 == 0), so only rows are masked and the loads stay 16-byte vectors.
    """
    return packed_ptr + rows[:, None] * (K // 8) + tl.arange(0, BK // 8)[None, :]


@triton.jit
def nf4_absmax(
    absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, rmask, k0, K,
    BK: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr,
):
    """fp32 [BR, BK/64]: the absmax of each 64-block of W[rows, k0:k0+BK], nested decode included."""
    blk = rows[:, None] * (K // 64) + (k0 // 64 + tl.arange(0, BK // 64))[None, :]
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=rmask[:, None], other=0).to(tl.int32)
        am = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=rmask[:, None], other=0.0) + offset
    else:
        am = tl.load(absmax_ptr + blk, mask=rmask[:, None], other=0.0)
    return am


@triton.jit
def _interleave8(o0, o1, o2, o3, o4, o5, o6, o7, BR: tl.constexpr, BK: tl.constexpr):
    """Eight [BR, BK/8] tensors -> [BR, BK] with element 8t+i taken from o_i[:, t].

    Each join adds a new fastest dimension, so the last join picks the lowest bit of i: element
    4x+2y+z ends up in join(join(.., ..)_z, ..) as o_{4x+2y+z}. In registers this is a relabeling:
    each thread's consecutive weights stay together for the dot operand.
    """
    w = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    return tl.reshape(w, (BR, BK))


@triton.jit
def _gather_nibbles(words, table, j: tl.constexpr):
    """(value of the high nibble, of the low nibble) of byte j of each packed word, fp32."""
    byte = (words >> (8 * j)) & 0xFF
    return tl.gather(table, byte >> 4, 1), tl.gather(table, byte & 15, 1)


@triton.jit
def nf4_decode(words, am, table, BR: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr, LUT_ASM: tl.constexpr):
    """W tile [BR, BK] in DTYPE from packed words [BR, BK/8], absmax [BR, BK/64], nf4_table(BR).

    Byte j of a word holds elements 2j (high nibble) and 2j+1 (low nibble).
    LUT_ASM: the PTX of lut.lut_asm(DTYPE) (compiled bf16/fp16 kernels), or "" for the exact
    path (a gather from the 16 values in registers, fp32 product rounded once, like
    bitsandbytes): fp32 inputs and the CPU interpreter, which cannot run inline PTX.
    Rows past N come out finite but not zero (absmax = offset there): the caller masks the
    other operand of the dot to zero, which costs less than a select per weight.
    """
    G: tl.constexpr = BK // 64
    if LUT_ASM == "":
        o0, o1 = _gather_nibbles(words, table, 0)
        o2, o3 = _gather_nibbles(words, table, 1)
        o4, o5 = _gather_nibbles(words, table, 2)
        o6, o7 = _gather_nibbles(words, table, 3)
        scale = am
    else:
        o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
            LUT_ASM, LUT_CONSTRAINTS, [words], dtype=(DTYPE.value,) * 8, is_pure=True, pack=1
        )
        scale = am.to(DTYPE)
    vals = _interleave8(o0, o1, o2, o3, o4, o5, o6, o7, BR, BK)
    if G == 1:
        w = vals * scale
    else:
        w = vals * tl.reshape(tl.broadcast_to(scale[:, :, None], (BR, G, 64)), (BR, BK))
    return w.to(DTYPE)


@triton.jit
def _decode_kernel(
    out_ptr, packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, N, K,
    NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, LUT_ASM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < N
    k0 = tl.program_id(1) * BK
    packed = tl.load(nf4_row_ptrs(packed_ptr, rows, K, BK) + k0 // 8, mask=rmask[:, None], other=0)
    am = nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, tl.load(offset_ptr), rows, rmask, k0, K, BK, NESTED, BLOCKSIZE2)
    w = nf4_decode(packed, am, nf4_table(code_ptr, BR), BR, BK, out_ptr.dtype.element_ty, LUT_ASM)
    tl.store(out_ptr + rows[:, None] * K + (k0 + tl.arange(0, BK))[None, :], w, mask=rmask[:, None])


def decode_nf4(weight: torch.Tensor, quant_state, dtype: torch.dtype = torch.float32, block_k: int = 64) -> torch.Tensor:
    """The whole weight decoded by `nf4_decode`, [N, K] in `dtype` (block_k must divide K): a check
    of the decoder against bitsandbytes.functional.dequantize_4bit, for tests and debugging only
    (the matmul kernels never build this tensor)."""
    w = nf4_weight(weight, quant_state)
    assert w.K % block_k == 0
    out = torch.empty((w.N, w.K), dtype=dtype, device=weight.device)
    grid = (triton.cdiv(w.N, 16), w.K // block_k)
    _decode_kernel[grid](out, *w.args(), w.N, w.K, **w.meta(dtype), BR=16, BK=block_k)
    return out
