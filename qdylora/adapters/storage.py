"""What a DyLoRA adapter stores: the shapes of its parameter tensors, in one place.

An adapter of a linear [out, in] has r_max components: the rows of A [r_max, in] and the columns
of B [out, r_max]. Every update rule keeps each side in one tensor, A [r_max, in] and B [out, r_max],
like peft's LoRA; the layer slices them (views). The rules differ in which components get a gradient
and which ones the optimizer steps (qdylora.train.optimizer.ComponentAdamW), not in storage.

The layer creates its parameters from `adapter_tensor_shapes` and the memory planner sizes adapters,
gradients and optimizer state from the same shapes.
"""

from __future__ import annotations

from .config import UPDATE_MODES


def adapter_tensor_shapes(in_features: int, out_features: int, r_max: int,
                          update: str) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of the A-side and B-side parameter tensors of one adapter: {'A': [...], 'B': [...]}."""
    if update not in UPDATE_MODES:
        raise ValueError(f"update={update!r}; use one of {', '.join(UPDATE_MODES)}")
    return {"A": [(r_max, in_features)], "B": [(out_features, r_max)]}
