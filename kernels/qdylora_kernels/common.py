"""Shared pieces of the kernels: interpreter detection, tile orderings, launch heuristics."""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Read once at import, as triton.jit does when it decorates our kernels: True means every
# kernel below is run by Triton's CPU interpreter (tests), on CPU tensors.
INTERPRET = _interpreting()

SMALL_M = 64  # at most this many rows: the split-K (GEMV-style) path, bound by reading the weight


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products like torch's default matmul; 16-bit ones ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def rank_block(R: int) -> int:
    """The padded rank tile: >= 16 (tl.dot's minimum), a power of two, at most 64 per step."""
    return min(64, max(16, triton.next_power_of_2(R)))


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on `device`; a small stand-in in the interpreter."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_count(tiles: int, steps: int, rows: int, device: torch.device) -> int:
    """How many slices to cut a reduction of `steps` loop steps into, for the split kernels.

    Enough programs (`tiles` per slice) to keep every SM streaming weights, about 4 per SM;
    at least 2 steps per slice; at most 128 / rows slices, so the fp32 atomics
    (rows * outputs * slices) stay small next to the weight bytes.
    """
    want = triton.cdiv(4 * sm_count(device), max(tiles, 1))
    cap = max(1, min(steps // 2, 128 // max(rows, 1)))
    return max(1, min(want, cap))


@triton.jit
def grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """(pid_a, pid_b) walking GROUP rows of tiles together, so their operands stay in L2."""
    per_group = GROUP * num_b
    group = pid // per_group
    first_a = group * GROUP
    size = tl.minimum(num_a - first_a, GROUP)
    pid_a = first_a + (pid % per_group) % size
    pid_b = (pid % per_group) // size
    return pid_a, pid_b
