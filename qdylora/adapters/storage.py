"""What a DyLoRA adapter stores per update mode: the shapes of its parameter tensors, in one place.

An adapter of a linear [out, in] has r_max components: the rows of A [r_max, in] and the columns
of B [out, r_max]. Each side is kept as a list of parameter tensors, each holding consecutive
components (rows of A, columns of B):

- 'nested': one tensor per side, A [r_max, in] and B [out, r_max], like peft's LoRA; the layer
  slices them (views).
- 'frozen': one tensor per component, r_max rows [in] and r_max columns [out]; the layer stacks
  them (a copy) and detaches every component but the trained one, so the others get no gradient
  and the optimizer skips them.

The layer creates its parameters from `adapter_tensor_shapes` (through `split_factors`) and the
memory planner sizes adapters, gradients and optimizer state from the same shapes.
"""

from __future__ import annotations

import torch

STORAGE_UPDATES = ("nested", "frozen")


def adapter_tensor_shapes(in_features: int, out_features: int, r_max: int,
                          update: str) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of the A-side and B-side parameter tensors of one adapter: {'A': [...], 'B': [...]}."""
    if update == "nested":
        return {"A": [(r_max, in_features)], "B": [(out_features, r_max)]}
    if update == "frozen":
        return {"A": [(in_features,)] * r_max, "B": [(out_features,)] * r_max}
    raise ValueError(f"update={update!r}; use one of {', '.join(STORAGE_UPDATES)}")


def components_per_tensor(shapes: list[tuple[int, ...]], r_max: int) -> int:
    """How many consecutive rank components each tensor of one side holds."""
    if not shapes or r_max % len(shapes):
        raise ValueError(f"{len(shapes)} tensors cannot hold {r_max} components evenly")
    return r_max // len(shapes)


def split_factors(A: torch.Tensor, B: torch.Tensor, update: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A [r_max, in] and B [out, r_max] cut into the tensors `adapter_tensor_shapes` names (contiguous copies)."""
    r_max, in_features = A.shape
    out_features = B.shape[0]
    shapes = adapter_tensor_shapes(in_features, out_features, r_max, update)
    k_a, k_b = components_per_tensor(shapes["A"], r_max), components_per_tensor(shapes["B"], r_max)
    a_parts = [t.reshape(s).clone(memory_format=torch.contiguous_format)
               for t, s in zip(A.split(k_a, dim=0), shapes["A"])]
    b_parts = [t.reshape(s).clone(memory_format=torch.contiguous_format)
               for t, s in zip(B.split(k_b, dim=1), shapes["B"])]
    return a_parts, b_parts
