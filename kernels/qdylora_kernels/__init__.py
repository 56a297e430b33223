"""Fused Triton kernels of QDyLoRA: NF4 dequant-matmul with the truncated low-rank path.

Imported as `qdylora_kernels` (pyproject maps it to `kernels/qdylora_kernels`). The outer
`kernels/` folder has no __init__.py on purpose: run from the repository root it is then only an
empty namespace, so bitsandbytes' and transformers' probes for the Hugging Face `kernels` package
find nothing, as they should. This package depends on torch and triton only.
`triton_qdylora_linear` has the signature and gradients of qdylora's reference op; `unsupported`
says when it cannot run a call. `ranks` (per-row ranks and masks) needs no triton, so the package
imports triton only when the op is asked for. Set TRITON_INTERPRET=1 before the first import of
the op to run it on CPU tensors (tests).
"""

import importlib

__all__ = ["TritonQDyLoRALinear", "triton_qdylora_linear", "unsupported"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".function", __name__), name)
    raise AttributeError(name)
