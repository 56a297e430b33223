"""The kernel benchmark's cases and targets: shapes, rows, ranks, methods, the H100 targets, tolerances."""

from __future__ import annotations

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (N out, K in)
ROWS = [1, 16, 256, 4096]
RANKS = [8, 64]
MODES = ["fwd", "fwd+bwd"]
METHODS = ["qdylora", "a", "b", "c"]
METHOD_NAMES = {
    "qdylora": "fused Triton (NF4)",
    "a": "dequantize+F.linear+LoRA",
    "b": "bf16 dense+LoRA",
    "c": "bnb.matmul_4bit+LoRA",
}
R_ALLOC = 64  # lora_A rows / lora_B columns allocated (r_max); the rank is a runtime value
ALPHA = 16.0
# the H100 targets: M = 4096 fwd+bwd >= 1.15x faster than (a) and within 1.10x of (b);
# M <= 16 >= 3x faster than (b) and >= 1.5x faster than bitsandbytes' path (c)
LARGE_M = 4096
SMALL_ROWS = 16
TARGETS = [  # (rows it applies to, mode, baseline, minimum speedup, label)
    ("large", "fwd+bwd", "a", 1.15, "M=4096 fwd+bwd vs (a) dequant+F.linear+LoRA"),
    ("large", "fwd+bwd", "b", 1 / 1.10, "M=4096 fwd+bwd vs (b) bf16 dense"),
    ("small", None, "b", 3.0, "M<=16 vs (b) bf16 dense"),
    ("small", None, "c", 1.5, "M<=16 vs (c) bnb.matmul_4bit"),
]
TOL = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 1e-4}


def modes_for(M: int, large: int, acceptance: bool) -> list[str]:
    """The modes measured at M rows: in the acceptance subset only those a target applies to."""
    if acceptance and M == large:
        return ["fwd+bwd"]
    return MODES
