"""The op's two implementations (the PyTorch reference, the CPU path; the Triton kernels) against a
hand-written formula differentiated by plain autograd, and the kernels' independence from qdylora.

Per row m of x, with rank r_m and W = bitsandbytes' dequantize_4bit of the packed weight:
    y_m = x_m W^T + (alpha / r_m) * sum_{k < r_m} (x_lora_m . A_k) B[:, k] + bias
written with one term per row and component and no rank masks. In 'frozen' mode only component
r_m - 1 of row m may get a gradient: the others enter the row's sum detached; in 'nested' mode every
component k < r_m does. Rank 0 is the base model alone. The formula runs in float64; the tolerance
table (dtype, atol, rtol) is what each compute dtype's rounding allows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# first: kernel_setup imports triton (under the interpreter without CUDA) before bitsandbytes does
from kernel_setup import (CUDA, LEAVES, interpreter_env, make_case, only_in_child, qk, run,  # noqa: F401
                          upstream_grad)

from bitsandbytes.functional import dequantize_4bit  # noqa: E402

from qdylora.ops.reference import ReferenceQDyLoRALinear  # noqa: E402
from qdylora_kernels.common import SMALL_M  # noqa: E402

NAMES = ("y", "dx", "dA", "dB", "dbias", "dx_lora")
# (dtype, atol, rtol) in the style of Liger-Kernel's tests; the interpreter cannot run bf16 dots
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-2, 1e-2),
    pytest.param(torch.bfloat16, 1e-1, 5e-2, id="bfloat16"),
]
KERNEL_TOLERANCES = TOLERANCES[:2] + [
    pytest.param(torch.bfloat16, 1e-1, 5e-2, id="bfloat16",
                 marks=pytest.mark.skipif(not CUDA, reason="bf16 dots are wrong in Triton's interpreter")),
]
# small shapes (the interpreter is slow): N not a multiple of the tiles, K one or two NF4 blocks
N, K, R = 40, 64, 16
PATHS = {"split": SMALL_M // 16, "gemm": SMALL_M + 3}  # rows: the split-K kernels, the tiled GEMMs


def formula(x, W, bias, A, B, ranks, alpha: float, update: str, x_lora=None):
    """y [M, N] of the formula in the module docstring, term by term."""
    xl = x if x_lora is None else x_lora
    rows = []
    for m in range(x.shape[0]):
        r = int(ranks[m])
        y_m = x[m] @ W.t()
        for k in range(r):
            a_k, b_k = A[k], B[:, k]
            if update == "frozen" and k != r - 1:
                a_k, b_k = a_k.detach(), b_k.detach()
            y_m = y_m + (alpha / r) * (xl[m] @ a_k) * b_k
        rows.append(y_m if bias is None else y_m + bias)
    return torch.stack(rows)


def formula_run(case, update: str, dy: torch.Tensor):
    """(y, dx, dA, dB, dbias, dx_lora) of the formula in float64 from the case's inputs, backward from dy."""
    leaves = {k: None if case[k] is None else case[k].detach().double().requires_grad_() for k in LEAVES}
    W = dequantize_4bit(case["weight"], case["quant_state"]).double()
    y = formula(leaves["x"], W, leaves["bias"], leaves["lora_A"], leaves["lora_B"], case["ranks"].tolist(),
                case["alpha"], update, leaves["x_lora"])
    y.backward(dy.double())
    return (y.detach(),) + tuple(None if leaves[k] is None else leaves[k].grad for k in LEAVES)


def row_ranks_for(M: int) -> list[int]:
    """Every rank 0..R over the rows, neighbours different (0: the base model alone)."""
    return [(5 * i) % (R + 1) for i in range(M)]


def check_against_formula(fn, M: int, dtype, atol: float, rtol: float, update: str, x_lora: bool = False):
    case = make_case(M, N, K, R, row_ranks_for(M), dtype=dtype, x_lora=x_lora, seed=M)
    got = run(fn, case, update)
    want = formula_run(case, update, upstream_grad(got[0]))
    for name, source, g, w in zip(NAMES, ("x",) + LEAVES, got, want):
        assert (g is None) == (w is None), name
        if w is None:
            continue
        assert g.dtype == case[source].dtype, f"{name}: {g.dtype}, its input is {case[source].dtype}"
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("update", ["frozen", "nested"])
@pytest.mark.parametrize("path", list(PATHS))
def test_reference_op_matches_formula(path, update, dtype, atol, rtol):
    check_against_formula(ReferenceQDyLoRALinear.apply, PATHS[path], dtype, atol, rtol, update)


@pytest.mark.parametrize("update", ["frozen", "nested"])
def test_reference_op_x_lora_matches_formula(update):
    check_against_formula(ReferenceQDyLoRALinear.apply, PATHS["split"], torch.float32, 1e-5, 1e-5, update, x_lora=True)


# rank-0 rows: the interpreter computes the scale alpha / 0, which the kernels then never select
ZERO_RANK_SCALE = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


@pytest.mark.kernels
@ZERO_RANK_SCALE
@pytest.mark.parametrize("dtype, atol, rtol", KERNEL_TOLERANCES)
@pytest.mark.parametrize("update", ["frozen", "nested"])
@pytest.mark.parametrize("path", list(PATHS))
def test_kernels_match_formula(path, update, dtype, atol, rtol):
    check_against_formula(qk.triton_qdylora_linear, PATHS[path], dtype, atol, rtol, update)


@pytest.mark.kernels
@ZERO_RANK_SCALE
@pytest.mark.parametrize("update", ["frozen", "nested"])
def test_kernels_x_lora_match_formula(update):
    check_against_formula(qk.triton_qdylora_linear, PATHS["split"], torch.float32, 1e-5, 1e-5, update, x_lora=True)


def test_formula_frozen_mode_trains_only_the_top_component():
    """The formula itself, by hand: one row at rank 2, frozen; only A_1 and B[:, 1] get gradient."""
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    B = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    W = torch.zeros(1, 2, dtype=torch.float64)
    y = formula(x, W, None, A, B, [2], 4.0, "frozen")
    # (4/2) * (x.A_0 * B_0 + x.A_1 * B_1) = 2 * (1 * 1 + 2 * 2)
    assert y.item() == 10.0
    y.sum().backward()
    assert A.grad.tolist() == [[0.0, 0.0], [4.0, 8.0], [0.0, 0.0]]  # 2 * B_1 * x on row 1 only
    assert B.grad.tolist() == [[0.0, 4.0, 0.0]]  # 2 * x.A_1 on column 1 only


def test_kernels_do_not_import_qdylora():
    """The kernel package (the op module too) depends on torch and triton only."""
    code = ("import sys, qdylora_kernels, qdylora_kernels.ranks, qdylora_kernels.function; "
            "assert not [m for m in sys.modules if m == 'qdylora' or m.startswith('qdylora.')], "
            "sorted(m for m in sys.modules if m.startswith('qdylora.'))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
