"""Per-GPU memory with several GPUs: DDP (every GPU holds everything, plus gradient buckets) or FSDP full
sharding (weights, adapters, gradients and optimizer state divided by the GPU count, plus the layers
gathered for the current computation).

- ddp: PyTorch DDP all-reduces gradients through buckets of the gradients' size (a second copy unless
  gradient_as_bucket_view), alive from the backward pass to the optimizer step.
- fsdp: every sharded item is divided by N; a forward or backward gathers one wrap unit (a decoder
  layer: its NF4 weights, norms and adapters; or the root: embeddings and head) and prefetches the
  next, so two units are held in full. Activations, logits and kernel transients stay per GPU.
"""

from __future__ import annotations

import math

from .architecture import ArchSpec
from .plan import MemoryItem
from .units import NF4_TABLE_BYTES, format_bytes, nf4_bytes

STRATEGIES = ("ddp", "fsdp")
SHARDED = ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state",
           "optimizer_state_paged")


def _unit_bytes(a: ArchSpec, r_max: int, c: int) -> tuple[int, int]:
    """(bytes of one decoder layer in full, bytes of the root unit: embeddings + head) as FSDP gathers them."""
    embed = a.vocab * a.hidden
    head = 0 if a.tied else a.vocab * a.hidden
    per_layer_unquant = max(0, a.unquantized_numel - embed - head - a.hidden) // max(1, a.n_layers)
    lin = a.layer_linears(0)
    layer = (sum(nf4_bytes(l.in_features * l.out_features) + NF4_TABLE_BYTES for l in lin)
             + per_layer_unquant * c + 4 * r_max * sum(l.in_features + l.out_features for l in lin if l.target))
    return layer, (embed + head) * c


def per_gpu(items: list[MemoryItem], phases: dict[str, int], a: ArchSpec, r_max: int, c: int,
            gradient_checkpointing: bool, strategy: str, n: int) -> tuple[list[MemoryItem], dict[str, int]]:
    """Items and phases of one GPU of `n` under `strategy` (unchanged for n == 1)."""
    if n == 1:
        return items, phases
    by = {it.name: it for it in items}
    grads = by["adapter_grads"].bytes
    out = [MemoryItem(it.name, it.bytes, it.detail, it.where) for it in items]
    phases = dict(phases)
    if strategy == "ddp":
        out.append(MemoryItem("ddp_buckets", grads, f"DDP's all-reduce buckets: a second copy of the adapter "
                                                    f"gradients ({format_bytes(grads)})"))
        phases["backward"] += grads
        phases["optimizer_step"] += grads
        return out, phases
    static = sum(by[k].bytes for k in ("nf4_weights", "unquantized_params", "adapters") if k in by)
    static += by["optimizer_state"].bytes if "optimizer_state" in by else 0
    keep = lambda b: math.ceil(b / n)  # noqa: E731
    for it in out:
        if it.name in SHARDED:
            it.bytes, it.detail = keep(it.bytes), f"{it.detail}; / {n} GPUs (FSDP full shard)"
    layer, root = _unit_bytes(a, r_max, c)
    gathered = max(layer, root) + layer  # the unit in use and the prefetched next one
    out.append(MemoryItem("fsdp_gathered", gathered, f"two wrap units held in full: the largest "
                                                      f"({format_bytes(max(layer, root))}) and the next layer"))
    saved_static = static - keep(static)
    saved_grads = grads - keep(grads)
    phases["loss"] += gathered - saved_static
    phases["backward"] += gathered - saved_static - (saved_grads if gradient_checkpointing else 0)
    phases["optimizer_step"] += -saved_static - saved_grads
    return out, phases
