"""Make freed CPU memory go back to the OS (glibc), so RSS follows the memory in use, not its high-water mark.

glibc serves allocations under its mmap threshold (dynamic, growing to 32 MiB once such a block is
freed) from heap arenas and keeps freed blocks there; a training step's many medium tensors
(activations, absmax tables, dequantized weights) then leave RSS hundreds of MB above what is live,
growing with the model. Both calls are no-ops off glibc.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024  # blocks from 64 KiB up get their own mapping, unmapped when freed

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _libc = False
    return _libc


def trim_heap() -> None:
    """Give the free pages of every heap arena back to the OS now (glibc keeps them otherwise)."""
    lib = _glibc()
    if lib:
        lib.malloc_trim(0)


def release_freed_memory() -> None:
    """From now on, return every freed block of 64 KiB or more to the OS at once (a fixed mmap threshold)."""
    lib = _glibc()
    if lib:
        lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
