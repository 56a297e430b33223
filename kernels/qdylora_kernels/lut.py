"""The NF4 lookup as a few byte permutes (PTX `prmt`), for the compiled bf16/fp16 kernels.

Decoding is what bounds these kernels: a lookup through `tl.gather` costs about 9 instructions
per weight (two warp shuffles, a select, the index arithmetic). Here four nibbles are looked up
at once by one `prmt` per byte plane: the 16 code values, in the compute dtype, are split into
a low-byte plane and a high-byte plane of 16 bytes (4 registers) each; `prmt` picks 4 bytes out
of 8 by 3-bit selectors, so each plane takes one `prmt` for codes 0-7, one for codes 8-15 and
one to choose between them by the nibble's top bit. Two more `prmt` interleave the planes
into 16-bit values. About 3 instructions per weight, no memory traffic, no shuffles
(`python -m qdylora_kernels.aot_check --sass` shows what the loops compile to).

The code values are rounded to the compute dtype before the absmax multiply (bitsandbytes
multiplies in fp32 and rounds once): at most one extra rounding of the compute dtype, far
below NF4's own error. fp32 inputs and the CPU interpreter (which cannot run inline PTX) use
the exact `tl.gather` path in nf4.py instead.

`lut_asm(dtype)` is the PTX for `tl.inline_asm_elementwise(..., pack=1)` over one 32-bit word
of the packed weight (the kernels load it as int32: byte j = bits 8j..8j+7, little-endian):
input $8 is the word, outputs $0..$7 are 16-bit registers holding the 8 weights in element
order, $2j the high nibble of byte j and $2j+1 its low nibble.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton.language as tl

# bitsandbytes.functional.get_4bit_type("nf4"); bitsandbytes' CUDA kernels hard-code it too
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _planes(dtype: torch.dtype) -> tuple[list[int], list[int]]:
    """(low-byte plane, high-byte plane) of the 16 values in `dtype`, 4 little-endian words each."""
    bits = torch.tensor(NF4_VALUES, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    lo = [int(b) & 0xFF for b in bits]
    hi = [int(b) >> 8 for b in bits]

    def words(plane):
        return [plane[4 * i] | plane[4 * i + 1] << 8 | plane[4 * i + 2] << 16 | plane[4 * i + 3] << 24 for i in range(4)]

    return words(lo), words(hi)


def _half(src: str, first_out: int) -> list[str]:
    """PTX decoding the two bytes in the low 16 bits of register `src` into outputs first_out..+3."""
    o = first_out
    return [
        # selector slots 0..3 hold the nibbles lo0, hi0, lo1, hi1; keep their low 3 bits
        f"and.b32 c, {src}, 0x7777;",
        # byte k of the result comes from the upper lookup (byte 4+k) where the nibble is >= 8
        # (add, not or: ptxas fuses and+or into one LOP3 that needs 0x4444 in a register)
        f"shr.b32 s, {src}, 1;",
        "and.b32 s, s, 0x4444;",
        "add.u32 s, s, 0x3210;",
        "prmt.b32 t0, p0, p1, c;",
        "prmt.b32 t1, p2, p3, c;",
        "prmt.b32 l, t0, t1, s;",  # low bytes of value(lo0), value(hi0), value(lo1), value(hi1)
        "prmt.b32 t0, q0, q1, c;",
        "prmt.b32 t1, q2, q3, c;",
        "prmt.b32 h, t0, t1, s;",  # their high bytes
        "prmt.b32 t0, l, h, 0x4051;",  # value(hi0) | value(lo0) << 16: elements 0, 1
        "prmt.b32 t1, l, h, 0x6273;",  # value(hi1) | value(lo1) << 16: elements 2, 3
        f"mov.b32 {{${o}, ${o + 1}}}, t0;",
        f"mov.b32 {{${o + 2}, ${o + 3}}}, t1;",
    ]


@lru_cache(maxsize=None)
def lut_asm(dtype: torch.dtype) -> str:
    """The PTX body (see the module docstring) decoding one packed word into 8 `dtype` values."""
    lo, hi = _planes(dtype)
    lines = ["{", ".reg .b32 p0, p1, p2, p3, q0, q1, q2, q3, c, s, t0, t1, l, h, u;"]
    lines += [f"mov.b32 p{i}, 0x{w:08x};" for i, w in enumerate(lo)]
    lines += [f"mov.b32 q{i}, 0x{w:08x};" for i, w in enumerate(hi)]
    lines += _half("$8", 0)
    lines += ["shr.b32 u, $8, 16;"]
    lines += _half("u", 4)
    lines += ["}"]
    return "\n".join(lines)


# the operands of lut_asm: 8 16-bit outputs, the packed word (a constexpr global for @triton.jit)
LUT_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r")
