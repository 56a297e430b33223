"""Sizes: parsing and printing memory amounts, NF4 storage per weight, and the constants of what bitsandbytes and CUDA allocate."""

from __future__ import annotations

import math
import re

from ..errors import PlannerError
from ..load.quantize import NESTED_BLOCKSIZE, NF4_BLOCKSIZE

KiB, MiB, GiB = 1024, 1024**2, 1024**3
# an 8-bit optimizer's signed and unsigned dynamic quantization maps (256 fp32 each), shared by all tensors
BNB_8BIT_QMAPS_BYTES = 2 * 256 * 4
# per-linear quantization tables: NF4 code (16 fp32) + nested dynamic code (256 fp32) + offset (fp32)
NF4_TABLE_BYTES = 16 * 4 + 256 * 4 + 4
# CUDA context of a recent driver + cuBLAS workspace; outside the torch allocator's count
CUDA_CONTEXT_BYTES = 512 * MiB
# reserved-but-unused blocks of the caching allocator (fragmentation), as a share of the peak
ALLOCATOR_SLACK = 0.03
TIGHT_FRACTION = 0.85  # above this share of the budget, choose_memory_settings plays safe


_UNITS = {
    "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_HOW = ("write a number and a unit such as 32GiB, 24GB, 80000MiB or 32G (G, M, K and GiB/MiB/KiB are binary; "
        "GB/MB/KB are decimal)")


def parse_memory_size(text: str | int | float) -> int:
    """Bytes from '32GiB', '24 GB', '80000MiB', '32G' (binary); a Python int or float is a number of bytes.

    A string needs its unit: '32' alone is refused rather than read as 32 bytes.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text <= 0:
            raise PlannerError(f"memory size {text} must be a positive number of bytes")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m and not m.group(2):
        raise PlannerError(f"memory size {text!r} has no unit; write {m.group(1)}GiB for {m.group(1)} GiB "
                           "(or another unit: GB, MiB, MB)")
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise PlannerError(f"cannot parse memory size {text!r}; {_HOW}")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise PlannerError(f"memory size {text!r} must be positive; {_HOW}")
    return int(value)


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. '19.43 GiB'."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 double-quantized weight of `numel` values, without the code tables."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    # packed 4-bit values, uint8 absmax per 64, fp32 absmax of those per 256
    return math.ceil(numel / 2) + blocks + 4 * nested_blocks


def dtype_bytes(dtype: str) -> int:
    """Bytes per value of a compute dtype name (bf16, fp16, fp32)."""
    if dtype in ("bf16", "bfloat16", "fp16", "float16"):
        return 2
    if dtype in ("fp32", "float32"):
        return 4
    raise PlannerError(f"dtype {dtype!r} is unknown; use bf16, fp16 or fp32")
