"""The fused Triton kernels against the PyTorch reference (qdylora.ops.reference).

How the kernels run here (compiled on CUDA, else Triton's interpreter, in this process or in a
child Python) is explained in kernel_setup.py. With CUDA the bf16 tests at real sizes marked
`gpu` run too. test_kernel_reference.py checks both against a hand-written formula.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

# first: kernel_setup imports triton (under the interpreter without CUDA) before bitsandbytes does
from kernel_setup import (CUDA, KERNEL_TEST_FILES, MODE, TOLERANCES, check_against_formula,  # noqa: F401
                          interpreter_env, make_case, only_in_child, qk, quantize, run, upstream_grad)

import bitsandbytes.functional as bnbF  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qdylora.ops.reference import ReferenceQDyLoRALinear  # noqa: E402
from qdylora_kernels.common import SMALL_M  # noqa: E402
from qdylora_kernels.nf4 import decode_nf4  # noqa: E402

pytestmark = pytest.mark.kernels


@pytest.mark.skipif(MODE != "subprocess", reason="only when triton was imported before this file")
def test_interpreter_suite_in_subprocess():
    """The kernel tests of this folder, in one child Python where triton is imported under the interpreter."""
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", *(str(here / f) for f in KERNEL_TEST_FILES),
                           "-m", "kernels", "-q", "-p", "no:cacheprovider"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# rows for each path: the split-K (decode) kernels take M <= SMALL_M, the tiled GEMMs the rest
SPLIT_M, GEMM_M = 5, SMALL_M + 3
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
NAMES = ("y", "dx", "dA", "dB", "dbias", "dx_lora")


def rel_err(ref, got):
    ref, got = ref.float(), got.float()
    return ((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def check(case, update="nested", tol=None, **kw):
    ref = run(ReferenceQDyLoRALinear.apply, case, update, **kw)
    got = run(qk.triton_qdylora_linear, case, update, **kw)
    tol = tol or TOL[case["x"].dtype]
    for name, r, t in zip(NAMES, ref, got):
        assert (r is None) == (t is None), f"{name}: reference gives {r is not None}, kernels {t is not None}"
        if r is not None:
            assert t.dtype == r.dtype and t.shape == r.shape, f"{name}: {t.dtype}{tuple(t.shape)} vs {r.dtype}{tuple(r.shape)}"
            assert torch.isfinite(t).all(), f"{name} has non-finite values"
            err = rel_err(r, t)
            assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------
# the decoder


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("N,K,block_k", [(48, 128, 64), (33, 256, 128), (17, 192, 64)])
def test_decoder_matches_bitsandbytes(N, K, block_k, nested):
    packed, qs = quantize(N, K, torch.float32, seed=3, nested=nested)
    want = bnbF.dequantize_4bit(packed, qs).float()
    got = decode_nf4(packed, qs, torch.float32, block_k=block_k)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _run_ptx(asm: str, inputs: list[int], n_out: int) -> list[int]:
    """A tiny PTX interpreter for what lut.lut_asm emits: mov/and/add/shr/prmt.b32 and the
    unpacking `mov.b32 {lo, hi}, r` into 16-bit outputs."""
    regs = {f"${n_out + i}": v & 0xFFFFFFFF for i, v in enumerate(inputs)}

    def val(tok):
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            lo_hi, src = rest[1:].split("}")
            lo, hi = (t.strip() for t in lo_hi.split(","))
            v = val(src.strip(" ,"))
            regs[lo], regs[hi] = v & 0xFFFF, v >> 16
            continue
        a = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            r = val(a[1])
        elif op == "and.b32":
            r = val(a[1]) & val(a[2])
        elif op == "add.u32":
            r = val(a[1]) + val(a[2])
        elif op == "shr.b32":
            r = val(a[1]) >> val(a[2])
        elif op == "prmt.b32":  # default mode: 4 selectors of 4 bits over the 8 bytes {b, a}
            src, sel, r = val(a[1]) | val(a[2]) << 32, val(a[3]), 0
            for k in range(4):
                s_k = (sel >> 4 * k) & 0xF
                byte = (src >> 8 * (s_k & 7)) & 0xFF
                if s_k & 8:
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << 8 * k
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
        regs[a[0]] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ptx_lookup_decodes_every_byte(dtype):
    """The inline-PTX lookup of the compiled kernels (not runnable in the interpreter), emulated:
    every byte value in every position of a packed word gives its two code values, in order."""
    from qdylora_kernels.lut import LUT_CONSTRAINTS, NF4_VALUES, lut_asm

    assert torch.equal(torch.tensor(NF4_VALUES), bnbF.get_4bit_type("nf4", device="cpu"))
    assert LUT_CONSTRAINTS.value.count("=h") == 8
    want = (torch.tensor(NF4_VALUES).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    asm = lut_asm(dtype)
    g = torch.Generator().manual_seed(0)
    for pos in range(4):
        for b in range(256):
            rest = int(torch.randint(0, 2**32, (1,), generator=g, dtype=torch.int64))
            word = (rest & ~(0xFF << 8 * pos)) | b << 8 * pos
            out = _run_ptx(asm, [word], 8)
            for j in range(4):
                byte = (word >> 8 * j) & 0xFF
                assert (out[2 * j], out[2 * j + 1]) == (want[byte >> 4], want[byte & 15]), (hex(word), j)


def test_kernels_compile_for_hopper():
    """Every bf16 configuration the wrappers launch compiles for sm_90 (Triton -> PTX -> cubin, no
    GPU needed): catches layout, inline-PTX and register problems the interpreter cannot see."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "qdylora_kernels.aot_check", "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("Triton's ptxas is not installed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernels compiled for sm_90" in proc.stdout


# ---------------------------------------------------------------------------------------------
# the op against the reference: forward, dx, dA, dB, dbias


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
@pytest.mark.parametrize("rank", [1, 15, 16, 17, 63, 64])
def test_ranks(M, rank):
    check(make_case(M, 48, 128, 64, rank))


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
@pytest.mark.parametrize("update", ["frozen", "nested", "even"])
def test_mixed_row_ranks(M, update):
    ranks = [(7 * i) % 64 + 1 for i in range(M)]  # 1..64, all different neighbours
    check(make_case(M, 48, 128, 64, ranks), update)


@pytest.mark.parametrize("M,N", [(1, 47), (33, 80), (67, 47), (129, 80)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_odd_shapes(M, N, bias):
    ranks = [(5 * i) % 17 + 1 for i in range(M)]
    check(make_case(M, N, 192, 17, ranks, bias=bias), "frozen")


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
@pytest.mark.parametrize("update", ["frozen", "nested"])
def test_x_lora(M, update):
    ranks = [(3 * i) % 64 + 1 for i in range(M)]
    check(make_case(M, 48, 128, 64, ranks, x_lora=True), update)


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
def test_fp16(M):
    ranks = [(11 * i) % 64 + 1 for i in range(M)]
    check(make_case(M, 80, 128, 64, ranks, dtype=torch.float16, x_lora=True))


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
def test_lora_in_fp32_with_fp16_x(M):
    # the adapter may be kept in fp32 while x is 16-bit: computed in x's dtype, grads in fp32
    check(make_case(M, 48, 128, 64, 40, dtype=torch.float16, ab_dtype=torch.float32))


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
def test_rank_above_one_tile(M):
    # R = 80 > 64: the rank tile loops twice; rows with rank 70 cross into the second tile
    ranks = [70 if i % 2 else 9 for i in range(M)]
    check(make_case(M, 48, 128, 80, ranks))


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
def test_plain_absmax(M):
    check(make_case(M, 48, 128, 16, 16, nested=False))


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
@pytest.mark.parametrize("grads", [("lora_A", "lora_B"), ("x",), ("x_lora", "lora_B")], ids=lambda g: "+".join(g))
def test_partial_grads(M, grads):
    check(make_case(M, 48, 128, 64, 33, x_lora=True), "frozen", grads=grads)


def test_no_grad_forward():
    case = make_case(SPLIT_M, 48, 128, 64, 20)
    with torch.no_grad():
        args = [case[k] for k in ("x", "weight", "quant_state", "bias", "lora_A", "lora_B", "ranks", "alpha")]
        want = ReferenceQDyLoRALinear.apply(*args, "nested", None)
        got = qk.triton_qdylora_linear(*args, "nested", None)
    assert rel_err(want, got) <= TOL[torch.float32]


@pytest.mark.parametrize("M", [SPLIT_M, GEMM_M], ids=["split", "gemm"])
@pytest.mark.parametrize("op", ["reference", "triton"])
def test_observe_gets_the_low_rank_activations(M, op):
    """observe (fisher-train's statistics) gets x_lora, dy, x_lora A^T and dy B once per backward, by hand."""
    case = make_case(M, 48, 128, 64, [(5 * i) % 64 + 1 for i in range(M)], x_lora=True)
    seen = []
    fn = ReferenceQDyLoRALinear.apply if op == "reference" else qk.triton_qdylora_linear
    run(lambda *args: fn(*args, lambda *t: seen.append([v.detach().clone() for v in t])), case, "nested")
    assert len(seen) == 1
    xl, dy, h, dyB = seen[0]
    y = ReferenceQDyLoRALinear.apply(*(case[k] for k in ("x", "weight", "quant_state", "bias", "lora_A", "lora_B",
                                                       "ranks", "alpha")), "nested", case["x_lora"])
    tol = dict(rtol=TOL[torch.float32], atol=1e-5)
    torch.testing.assert_close(xl, case["x_lora"], **tol)
    torch.testing.assert_close(dy, upstream_grad(y), **tol)
    torch.testing.assert_close(h, case["x_lora"] @ case["lora_A"].t(), **tol)
    torch.testing.assert_close(dyB, upstream_grad(y) @ case["lora_B"], **tol)


# few examples, fixed seed and no shrinking: every example is a few interpreter runs
@settings(max_examples=6, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck), database=None)
@given(
    M=st.integers(1, 80),
    N=st.integers(16, 96),
    K=st.sampled_from([64, 128, 192]),
    R=st.integers(1, 64),
    update=st.sampled_from(["frozen", "nested"]),
    data=st.data(),
)
def test_property_shapes_and_ranks(M, N, K, R, update, data):
    ranks = data.draw(st.lists(st.integers(1, R), min_size=M, max_size=M))
    check(make_case(M, N, K, R, ranks, bias=data.draw(st.booleans()), seed=M * 1000 + N), update)


# ---------------------------------------------------------------------------------------------
# fallback and dispatch


def test_in_features_not_multiple_of_64_falls_back(monkeypatch):
    import qdylora_kernels.function as qk_function

    from qdylora import ops
    from qdylora.ops import dispatch

    monkeypatch.setattr(dispatch, "_triton_impl", lambda: qk_function)
    case = make_case(3, 16, 96, 8, 4)
    with pytest.warns(UserWarning, match="not a multiple of 64"):
        got = run(lambda *a: ops.qdylora_linear(*a, backend="triton"), case, "nested")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = run(ReferenceQDyLoRALinear.apply, case, "nested")
    for r, t in zip(want, got):
        if r is not None:
            torch.testing.assert_close(t, r)


def test_bad_update_is_rejected():
    case = make_case(3, 48, 64, 8, 4)
    with pytest.raises(ValueError, match="update"):
        run(qk.triton_qdylora_linear, case, "sometimes")


def test_ops_dispatch_to_triton(monkeypatch):
    """qdylora.ops with backend='triton' runs these kernels on a 3-D input with one rank per batch."""
    import qdylora_kernels.function as qk_function

    from qdylora import ops
    from qdylora.ops import dispatch

    monkeypatch.setattr(dispatch, "_triton_impl", lambda: qk_function)
    case = make_case(6, 48, 128, 32, 1)
    x3 = case["x"].reshape(2, 3, 128)
    args = (case["weight"], case["quant_state"], case["bias"], case["lora_A"], case["lora_B"], torch.tensor([5, 32]), 8.0)
    got = ops.qdylora_linear(x3, *args, backend="triton")
    want = ops.qdylora_linear(x3, *args, backend="reference")
    assert got.shape == (2, 3, 48)
    assert rel_err(want, got) <= TOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at real sizes


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 16, 64, 65, 4096])
@pytest.mark.parametrize("update", ["frozen", "nested"])
def test_gpu_bf16_4096(M, update):
    ranks = [(13 * i) % 64 + 1 for i in range(M)]
    check(make_case(M, 4096, 4096, 64, ranks, dtype=torch.bfloat16, x_lora=(M % 2 == 1)), update)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [16, 80], ids=["split", "gemm"])
@pytest.mark.parametrize("update", ["frozen", "nested"])
def test_gpu_bf16_matches_formula(M, update):
    """bf16, compiled (the PTX lookup), against kernel_setup.formula (float64 autograd, no rank masks)."""
    ranks = [(7 * i) % 65 for i in range(M)]  # 0..64
    atol, rtol = next(t[1:] for t in TOLERANCES if t[0] == torch.bfloat16)
    check_against_formula(qk.triton_qdylora_linear, make_case(M, 256, 256, 64, ranks, dtype=torch.bfloat16),
                          update, atol, rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 4096])
def test_gpu_no_dense_weight_buffer(M):
    """Neither forward nor backward allocates anything near the [N, K] bf16 weight (32 MiB here)."""
    N = K = 4096
    case = make_case(M, N, K, 64, 64, dtype=torch.bfloat16)
    run(qk.triton_qdylora_linear, case, "nested")  # compile and warm the allocator
    torch.cuda.synchronize()
    leaves = {k: case[k].detach().clone().requires_grad_() for k in ("x", "lora_A", "lora_B")}
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = qk.triton_qdylora_linear(leaves["x"], case["weight"], case["quant_state"], case["bias"], leaves["lora_A"],
                                 leaves["lora_B"], case["ranks"], 16.0, "nested", None)
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - base
    # y, dy and dx in bf16, fp32 split-K workspaces, the adapter's grads, slack for the small
    # [M, R] tensors; a dense bf16 weight would add N*K*2 = 32 MiB on top
    workspace = M * (max(N, K) + 64) * 4 if M <= SMALL_M else 0
    budget = M * (2 * N + K) * 2 + workspace + 64 * (N + K) * 4 + (6 << 20)
    assert transient < budget, f"{transient / 2**20:.1f} MiB transient > {budget / 2**20:.1f} MiB"
