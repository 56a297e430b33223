"""Fused Triton kernels of QDyLoRA: NF4 dequant-matmul with the truncated low-rank path.

Imported as `qdylora_kernels` (pyproject maps it to `kernels/qdylora_kernels`). The outer
`kernels/` folder has no __init__.py on purpose: run from the repository root it is then only an
empty namespace, so bitsandbytes' and transformers' probes for the Hugging Face `kernels` package
find nothing, as they should.
`triton_qdylora_linear` has the signature and gradients of
`qdylora.reference.ReferenceQDyLoRALinear.apply`; `qdylora.ops` dispatches to it on CUDA.
Set TRITON_INTERPRET=1 before the first import to run it on CPU tensors (tests).
"""

from .function import TritonQDyLoRALinear, triton_qdylora_linear

__all__ = ["TritonQDyLoRALinear", "triton_qdylora_linear"]
