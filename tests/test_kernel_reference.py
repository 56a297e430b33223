"""The op's two implementations (the PyTorch reference, the CPU path; the Triton kernels) against the
hand-written formula of kernel_setup.formula (one term per row and component, no rank masks,
frozen mode by .detach()) differentiated by plain autograd in float64; and the kernels' independence
from qdylora.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# first: kernel_setup imports triton (under the interpreter without CUDA) before bitsandbytes does
from kernel_setup import (TOLERANCES, check_against_formula, formula, interpreter_env, make_case,  # noqa: F401
                          only_in_child, qk, run)

from qdylora.ops.reference import ReferenceQDyLoRALinear  # noqa: E402
from qdylora_kernels.common import SMALL_M  # noqa: E402

# small shapes (the interpreter is slow): N not a multiple of the kernels' tiles, K one NF4 block
N, K, R = 40, 64, 16
PATHS = {"split": SMALL_M // 16, "gemm": SMALL_M + 3}  # rows: the split-K kernels, the tiled GEMMs
# bf16 for the kernels on CUDA only (tests/test_kernels.py::test_gpu_bf16_matches_formula): the
# interpreter's bf16 dots are wrong
KERNEL_TOLERANCES = [t for t in TOLERANCES if t[0] != torch.bfloat16]
# rank-0 rows: the interpreter computes the scale alpha / 0, which the kernels then never select
ZERO_RANK_SCALE = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def case_for(path: str, dtype: torch.dtype, x_lora: bool = False) -> dict:
    """A call on `path`'s row count with every rank 0..R over the rows, neighbours different."""
    M = PATHS[path]
    return make_case(M, N, K, R, [(5 * i) % (R + 1) for i in range(M)], dtype=dtype, x_lora=x_lora, seed=M)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("update", ["frozen", "nested", "even"])
@pytest.mark.parametrize("path", list(PATHS))
def test_reference_op_matches_formula(path, update, dtype, atol, rtol):
    check_against_formula(ReferenceQDyLoRALinear.apply, case_for(path, dtype), update, atol, rtol)


@pytest.mark.parametrize("update", ["frozen", "nested", "even"])
def test_reference_op_x_lora_matches_formula(update):
    check_against_formula(ReferenceQDyLoRALinear.apply, case_for("split", torch.float32, x_lora=True), update,
                          *TOLERANCES[0][1:])


@pytest.mark.kernels
@ZERO_RANK_SCALE
@pytest.mark.parametrize("dtype, atol, rtol", KERNEL_TOLERANCES)
@pytest.mark.parametrize("update", ["frozen", "nested"])
@pytest.mark.parametrize("path", list(PATHS))
def test_kernels_match_formula(path, update, dtype, atol, rtol):
    check_against_formula(qk.triton_qdylora_linear, case_for(path, dtype), update, atol, rtol)


@pytest.mark.kernels
@ZERO_RANK_SCALE
@pytest.mark.parametrize("update", ["frozen", "nested", "even"])
def test_kernels_x_lora_match_formula(update):
    check_against_formula(qk.triton_qdylora_linear, case_for("split", torch.float32, x_lora=True), update,
                          *TOLERANCES[0][1:])


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


def _stored_as(case: dict, dtype: torch.dtype) -> dict:
    """The case with its packed NF4 bytes stored as `dtype` (bitsandbytes' quant_storage: the same bytes)."""
    return {**case, "weight": case["weight"].reshape(-1).view(dtype).unsqueeze(1)}


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_reference_op_reads_the_packed_bytes_in_any_storage_dtype(storage):
    case = case_for("split", torch.float32)
    want, got = (run(ReferenceQDyLoRALinear.apply, c, "nested") for c in (case, _stored_as(case, storage)))
    for a, b in zip(want, got):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.kernels
@ZERO_RANK_SCALE
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", list(PATHS))
def test_kernels_read_the_packed_bytes_in_any_storage_dtype(path, storage):
    case = case_for(path, torch.float32)
    stored = _stored_as(case, storage)
    assert qk.unsupported(stored["x"], stored["weight"], stored["quant_state"], stored["bias"], stored["lora_A"],
                          stored["lora_B"], stored["ranks"]) is None
    want, got = (run(qk.triton_qdylora_linear, c, "nested") for c in (case, stored))
    for a, b in zip(want, got):
        assert (a is None and b is None) or torch.equal(a, b)
