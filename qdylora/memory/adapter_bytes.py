"""The adapters' bytes in a training step, derived from the tensors the layer creates and the update rule.

Every number here comes from `qdylora.adapters.storage.adapter_tensor_shapes` (what the layer
stores) and the op's gradient mask (`qdylora_kernels.ranks.rank_masks`: which components get a
gradient at a rank), plus how autograd and the optimizers treat such tensors:

- each side is one tensor, sliced at rank r (a view); autograd's slice backward gives the whole
  tensor a gradient of its full size, zero rows included, whatever the rank.
- the op saves A and B cast to the compute dtype: no copy when they are fp32 views the op can
  use as they are, otherwise a copy of the first r components.
- training steps adapters with ComponentAdamW (qdylora.train.optimizer), whose state sizes come from
  `component_state_nbytes`: two fp32 moments per value, or in 8 bit two uint8 moments per value
  (components padded to 256-value blocks) plus an fp32 absmax per block; paged, like bitsandbytes'
  paged optimizers, for tensors of at least 1e5 values, on CUDA only. Over a run every tensor gets
  a gradient at some rank, so every tensor has state (steady state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..adapters import storage
from ..train.optimizer import STEP_TEMPORARIES, component_state_nbytes, state_settings

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
    step_temporaries: int = 0  # the optimizer's fp32 temporaries for one tensor (the largest is the peak)
    saved_copies: int = 0  # A/B copies the op saves for backward, one forward of each linear

    def __add__(self, other: "AdapterBytes") -> "AdapterBytes":
        # the optimizer steps one tensor at a time: its temporaries peak at the largest tensor's
        return AdapterBytes(*(max(getattr(self, k), getattr(other, k)) if k == "step_temporaries"
                              else getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__))

    def __mul__(self, n: int) -> "AdapterBytes":
        return AdapterBytes(*(getattr(self, k) * (1 if k == "step_temporaries" else n)
                              for k in self.__dataclass_fields__))


@lru_cache(maxsize=None)
def grad_components(rank: int, r_max: int, update: str) -> frozenset[int]:
    """The components (0-based) whose gradient is not masked out at `rank` under `update`."""
    import torch
    from qdylora_kernels.ranks import rank_masks

    _, grad = rank_masks(torch.tensor([rank]), r_max, 1.0, update)
    return frozenset(torch.nonzero(grad[0]).flatten().tolist())


def tensor_state_bytes(shape: tuple[int, ...], side: str, optim: str, device: str) -> tuple[int, int]:
    """(state bytes, bytes of it that are paged) of one adapter tensor under ComponentAdamW."""
    n_comp = shape[COMPONENT_DIM[side]] if len(shape) == 2 else 1
    return component_state_nbytes(n_comp, math.prod(shape) // n_comp, **state_settings(optim), device=device)


def _side(shape: tuple[int, int], side: str, r_max: int, rank: int, comps: frozenset[int],
          compute_bytes: int, kernel: str) -> AdapterBytes:
    """Gradient and saved-copy bytes of one side (A [r_max, in] or B [out, r_max]) of one adapter at `rank`."""
    numel = math.prod(shape)
    per_comp = numel // r_max  # values of one component (in for A, out for B)
    grads = numel * FP32 if any(c < rank for c in comps) else 0  # the slice's gradient is full size
    # a slice along dim 0 is contiguous; along dim 1 only when it is the whole tensor
    contiguous = COMPONENT_DIM[side] == 0 or rank >= r_max
    copy = compute_bytes != FP32 or (kernel == "triton" and not contiguous)
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
        (shape,) = shapes[side]
        total += _side(shape, side, r_max, rank, comps, compute_bytes, kernel)
        for s in shapes[side]:
            state, paged = tensor_state_bytes(s, side, optim, device)
            total += AdapterBytes(tensors=1, params=math.prod(s), state=state, paged=paged,
                                  paged_tensors=int(paged > 0), step_temporaries=STEP_TEMPORARIES * FP32 * math.prod(s))
    return total
