"""The adapters' bytes in a training step, derived from the tensors the layer creates and the update rule.

Every number here comes from `qdylora.adapters.storage.adapter_tensor_shapes` (what the layer
stores) and the op's gradient mask (`qdylora_kernels.ranks.rank_masks`: which components get a
gradient at a rank), plus how autograd and the optimizers treat such tensors:

- a side kept in one tensor is sliced at rank r (a view); autograd's slice backward gives the
  whole tensor a gradient of its full size, zero rows included, whatever the rank.
- a side kept in several tensors is stacked at rank r (a copy of the first r components); the
  layer detaches the tensors without a gradient component; the stack's gradient is one
  [r, in] / [out, r] tensor. A tensor of A (rows: contiguous slices of it) keeps a view, so the
  whole stack gradient stays alive; a tensor of B (columns: strided slices) gets a copy of its
  own size, because a gradient must have its parameter's layout.
- the op saves A and B cast to the compute dtype: no copy when they are fp32 views the op can
  use as they are, otherwise a copy of the first r components.
- AdamW keeps two fp32 states per value; bitsandbytes' 8-bit AdamW two uint8 states plus an
  fp32 absmax per 256 values each, except for tensors below 4096 values (kept 32-bit);
  bitsandbytes' paged optimizers page the states of tensors of at least 1e5 values, on CUDA only.
  Over a run every tensor gets a gradient at some rank, so every tensor has state (steady state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..adapters import storage
from .units import BNB_8BIT_BLOCKSIZE, BNB_MIN_8BIT_SIZE, BNB_PAGED_MIN_NUMEL

FP32 = 4
# the dimension along which each side holds its components: rows of A [r, in], columns of B [out, r]
COMPONENT_DIM = {"A": 0, "B": 1}


@dataclass(frozen=True)
class AdapterBytes:
    """Bytes of the adapters of some linears in one training step (sums over linears)."""

    tensors: int = 0  # parameter tensors
    params: int = 0  # values (fp32)
    grads: int = 0  # gradient storage at the planned rank
    state: int = 0  # optimizer state, every tensor stepped
    paged: int = 0  # part of `state` bitsandbytes pages
    paged_tensors: int = 0
    fp32_state_tensors: int = 0  # tensors an 8-bit optimizer keeps in 32 bit
    saved_copies: int = 0  # A/B copies the op saves for backward, one forward of each linear

    def __add__(self, other: "AdapterBytes") -> "AdapterBytes":
        return AdapterBytes(*(getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__))

    def __mul__(self, n: int) -> "AdapterBytes":
        return AdapterBytes(*(getattr(self, k) * n for k in self.__dataclass_fields__))


@lru_cache(maxsize=None)
def grad_components(rank: int, r_max: int, update: str) -> frozenset[int]:
    """The components (0-based) whose gradient is not masked out at `rank` under `update`."""
    import torch
    from qdylora_kernels.ranks import rank_masks

    _, grad = rank_masks(torch.tensor([rank]), r_max, 1.0, update)
    return frozenset(torch.nonzero(grad[0]).flatten().tolist())


def tensor_state_bytes(numel: int, optim: str, device: str) -> tuple[int, int, bool]:
    """(state bytes, bytes of it that are paged, kept in 32 bit by an 8-bit optimizer) for one tensor."""
    eight_bit = optim.endswith("8bit")
    if eight_bit and numel >= BNB_MIN_8BIT_SIZE:
        state = 2 * numel  # two uint8 states
        extra = 2 * FP32 * math.ceil(numel / BNB_8BIT_BLOCKSIZE)  # their fp32 absmax, never paged
    else:
        state, extra = 2 * FP32 * numel, 0
    paged = state if optim.startswith("paged_") and device == "cuda" and numel >= BNB_PAGED_MIN_NUMEL else 0
    return state + extra, paged, eight_bit and numel < BNB_MIN_8BIT_SIZE


def _side(shapes: list[tuple[int, ...]], side: str, r_max: int, rank: int, comps: frozenset[int],
          compute_bytes: int, kernel: str) -> AdapterBytes:
    """Gradient and saved-copy bytes of one side (A or B) of one adapter at `rank`."""
    k = storage.components_per_tensor(shapes, r_max)
    numel = [math.prod(s) for s in shapes]
    used = [j for j in range(len(shapes)) if j * k < rank]  # tensors the forward at `rank` reads
    receiving = [j for j in used if any(c in comps for c in range(j * k, (j + 1) * k))]
    per_comp = numel[0] // k  # values of one component (in for A, out for B)
    if len(shapes) == 1:
        grads = numel[0] * FP32 if receiving else 0
        # a slice along dim 0 is contiguous; along dim 1 only when it is the whole tensor
        contiguous = COMPONENT_DIM[side] == 0 or rank >= r_max
        copy = compute_bytes != FP32 or (kernel == "triton" and not contiguous)
    else:
        if not receiving:
            grads = 0
        elif COMPONENT_DIM[side] == 0:
            grads = rank * per_comp * FP32  # the stack's whole gradient, kept alive by the views
        else:
            grads = sum(numel[j] for j in receiving) * FP32
        copy = True
    return AdapterBytes(grads=grads, saved_copies=rank * per_comp * compute_bytes if copy else 0)


@lru_cache(maxsize=4096)
def adapter_bytes(in_features: int, out_features: int, r_max: int, update: str, optim: str, device: str,
                  compute_bytes: int, kernel: str, rank: int | None = None) -> AdapterBytes:
    """Bytes of one linear's adapter at `rank` (default r_max: the step with the most gradient and activations)."""
    rank = r_max if rank is None else rank
    shapes = storage.adapter_tensor_shapes(in_features, out_features, r_max, update)
    comps = grad_components(rank, r_max, update)
    total = AdapterBytes()
    for side in ("A", "B"):
        total += _side(shapes[side], side, r_max, rank, comps, compute_bytes, kernel)
        for s in shapes[side]:
            n = math.prod(s)
            state, paged, fp32_kept = tensor_state_bytes(n, optim, device)
            total += AdapterBytes(tensors=1, params=n, state=state, paged=paged, paged_tensors=int(paged > 0),
                                  fp32_state_tensors=int(fp32_kept))
    return total
