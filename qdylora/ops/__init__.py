"""The QDyLoRA linear op: NF4 base matmul plus the low-rank path at per-row ranks, on Triton or PyTorch."""

from .dispatch import BACKENDS, qdylora_linear, resolve_backend, row_ranks
from .reference import ReferenceQDyLoRALinear, dequantize_nf4

__all__ = ["BACKENDS", "ReferenceQDyLoRALinear", "dequantize_nf4", "qdylora_linear", "resolve_backend", "row_ranks"]
