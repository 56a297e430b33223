"""What the kernel test modules share (not a test module): how the kernels are imported, call inputs,
and the hand-written formula the op's implementations are checked against.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) on tiny shapes,
in fp32 and fp16 (bf16 dots are wrong in the interpreter). With CUDA the same tests run compiled
on the GPU.

TRITON_INTERPRET must be set when triton itself is imported (its standard library is decorated
then) and while the interpreter runs. Three cases, decided once, at the first import of this module:
- "gpu": CUDA available, compiled kernels;
- "interpreter": TRITON_INTERPRET already set, or triton not imported yet (a kernel test file run
  alone): the variable is set around the import of qdylora_kernels and, by the `interpreter_env`
  fixture, while a kernel test module runs, and restored otherwise;
- "subprocess": triton was already imported without the interpreter (the whole suite, where
  bitsandbytes imports it first): the kernel tests are skipped in-process and
  test_kernels.py::test_interpreter_suite_in_subprocess runs the kernel test files in one child
  Python with the variable set.
A kernel test module imports `interpreter_env` and `only_in_child` so that both apply to it, and
marks the tests that run the kernels with `pytest.mark.kernels`.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# the kernel test files the child Python runs (this folder)
KERNEL_TEST_FILES = ("test_kernels.py", "test_kernel_reference.py")
SUBPROCESS_TEST = "test_interpreter_suite_in_subprocess"


def _mode() -> str:
    if CUDA:
        return "gpu"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or "triton" not in sys.modules:
        return "interpreter"
    return "subprocess"


MODE = _mode()


def _import_kernels():
    if MODE != "interpreter":
        import qdylora_kernels

        return qdylora_kernels
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        # a copy imported earlier without the interpreter has compiled-mode kernels: start afresh
        for name in [m for m in sys.modules if m == "qdylora_kernels" or m.startswith("qdylora_kernels.")]:
            del sys.modules[name]
        import qdylora_kernels
        import qdylora_kernels.function  # noqa: F401  (triton is imported here, under the interpreter)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return qdylora_kernels


qk = _import_kernels()


@pytest.fixture(autouse=True, scope="module")
def interpreter_env():
    """TRITON_INTERPRET=1 while the module's tests run, in interpreter mode."""
    if MODE != "interpreter":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def only_in_child(request):
    """In subprocess mode, skip every test marked `kernels` (but the one starting the child): the child runs them."""
    if (MODE == "subprocess" and request.node.get_closest_marker("kernels") is not None
            and request.node.name != SUBPROCESS_TEST):
        pytest.skip(f"triton was imported without the interpreter: run by test_kernels.py::{SUBPROCESS_TEST}")


import bitsandbytes.functional as bnbF  # noqa: E402

# (dtype, atol, rtol) in the style of Liger-Kernel's tests: what each compute dtype's rounding allows
# against the float64 formula; at the CPU test shapes the largest error of each implementation and
# dtype is about a third of its allowance (bf16 measured on the reference op only)
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-2, 1e-2),
    (torch.bfloat16, 2e-1, 5e-2),
]
NAMES = ("y", "dx", "dA", "dB", "dbias", "dx_lora")


def quantize(N: int, K: int, dtype: torch.dtype, seed: int = 0, nested: bool = True):
    """(packed, quant_state): bitsandbytes' NF4 (blocksize 64) of a random [N, K] weight."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.05).to(device=DEVICE, dtype=dtype)
    return bnbF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")


def make_case(M, N, K, R, ranks, dtype=torch.float32, bias=True, x_lora=False, nested=True, seed=0, ab_dtype=None):
    """Inputs of one call; ranks: an int (every row) or a list with one rank per row."""
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dt)

    packed, qs = quantize(N, K, dtype, seed, nested)
    r = torch.full((M,), ranks) if isinstance(ranks, int) else torch.as_tensor(ranks)
    return dict(
        x=rnd(M, K), weight=packed, quant_state=qs, bias=rnd(N) if bias else None,
        lora_A=rnd(R, K, scale=0.1, dt=ab_dtype or dtype), lora_B=rnd(N, R, scale=0.1, dt=ab_dtype or dtype),
        ranks=r.to(device=DEVICE, dtype=torch.long), alpha=16.0, x_lora=rnd(M, K) if x_lora else None,
    )


LEAVES = ("x", "lora_A", "lora_B", "bias", "x_lora")  # in the order of run()'s gradients


def upstream_grad(y: torch.Tensor) -> torch.Tensor:
    """The fixed dL/dy every backward in these tests starts from."""
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device=y.device, dtype=y.dtype)


def run(fn, case, update, grads=LEAVES):
    """(y, dx, dA, dB, dbias, dx_lora) of fn on fresh leaves; None where not asked for."""
    leaves = {}
    for k in LEAVES:
        t = case[k]
        leaves[k] = None if t is None else t.detach().clone().requires_grad_(k in grads)
    y = fn(leaves["x"], case["weight"], case["quant_state"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
           case["ranks"], case["alpha"], update, leaves["x_lora"])
    y.backward(upstream_grad(y))
    return (y,) + tuple(None if leaves[k] is None else leaves[k].grad for k in LEAVES)


def formula(x, W, bias, A, B, ranks, alpha: float, update: str, x_lora=None):
    """y [M, N], one row and one component at a time, without rank masks:

    y_m = x_m W^T + (alpha / r_m) * sum_{k < r_m} (x_lora_m . A_k) B[:, k] + bias   (rank 0: base only).
    'frozen': only component r_m - 1 of row m can get a gradient, the others enter detached;
    'nested': every component k < r_m can; 'even': the same, but A and B see it at the scale alpha / R
    (R = A's rows) instead of alpha / r_m, while the output and dx keep alpha / r_m.
    """
    xl = x if x_lora is None else x_lora
    rows = []
    for m in range(x.shape[0]):
        r = int(ranks[m])
        y_m = x[m] @ W.t()
        for k in range(r):
            a_k, b_k = A[k], B[:, k]
            if update == "frozen" and k != r - 1:
                a_k, b_k = a_k.detach(), b_k.detach()
            if update == "even":  # the value a_k, a gradient times r / R: (alpha / r) (r / R) = alpha / R
                c = r / A.shape[0]
                a_k, b_k = a_k * c + a_k.detach() * (1 - c), b_k * c + b_k.detach() * (1 - c)
            y_m = y_m + (alpha / r) * (xl[m] @ a_k) * b_k
        rows.append(y_m if bias is None else y_m + bias)
    return torch.stack(rows)


def formula_run(case, update: str, dy: torch.Tensor):
    """(y, dx, dA, dB, dbias, dx_lora) of the formula by autograd in float64, W = bitsandbytes' dequantize_4bit."""
    leaves = {k: None if case[k] is None else case[k].detach().double().requires_grad_() for k in LEAVES}
    W = bnbF.dequantize_4bit(case["weight"], case["quant_state"]).double()
    y = formula(leaves["x"], W, leaves["bias"], leaves["lora_A"], leaves["lora_B"], case["ranks"].tolist(),
                case["alpha"], update, leaves["x_lora"])
    y.backward(dy.double())
    return (y.detach(),) + tuple(None if leaves[k] is None else leaves[k].grad for k in LEAVES)


def check_against_formula(fn, case, update: str, atol: float, rtol: float) -> None:
    """fn's output and every gradient equal the formula's within (atol, rtol), in the input's dtype."""
    got = run(fn, case, update)
    want = formula_run(case, update, upstream_grad(got[0]))
    for name, source, g, w in zip(NAMES, ("x",) + LEAVES, got, want):
        assert (g is None) == (w is None), name
        if w is None:
            continue
        assert g.dtype == case[source].dtype, f"{name}: {g.dtype}, its input is {case[source].dtype}"
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
