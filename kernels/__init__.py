"""Fused Triton kernels of QDyLoRA: NF4 dequant-matmul with the truncated low-rank path.

Imported as `qdylora_kernels` (pyproject maps the package to this `kernels/` folder).
`triton_qdylora_linear` has the signature and gradients of
`qdylora.reference.ReferenceQDyLoRALinear.apply`; `qdylora.ops` dispatches to it on CUDA.
Set TRITON_INTERPRET=1 before the first import to run it on CPU tensors (tests).
"""

__all__ = []

if __name__ == "qdylora_kernels":
    from .function import TritonQDyLoRALinear, triton_qdylora_linear

    __all__ = ["TritonQDyLoRALinear", "triton_qdylora_linear"]
# Otherwise this folder was found as `kernels`, because the repository root is on sys.path and
# bitsandbytes / transformers probe for the Hugging Face `kernels` package: stay an empty
# module (no get_kernel, no version), so those probes conclude it is absent, as they should.
