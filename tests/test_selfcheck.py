"""The Triton path's self-check (qdylora.ops.selfcheck): a planted fault falls back once, or raises when Triton is forced.

Three groups:
- in this process, a stand-in kernels module (the reference op, or one planted fault) drives the
  dispatcher's logic: one probe per variant, one warning, the reference's results afterwards,
  BackendError under QDYLORA_BACKEND=triton;
- the real kernels in Triton's CPU interpreter (fp32), in a child Python with TRITON_INTERPRET=1
  (triton reads it at import): the check passes on the real kernels and catches a broken one;
- on CUDA (marked gpu): the check passes in bf16 on both kernel paths and costs under 1 s once compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
import warnings

import bitsandbytes.functional as bnbF
import pytest
import torch

from qdylora.errors import BackendError
from qdylora.ops import dispatch, qdylora_linear, selfcheck
from qdylora.ops.reference import ReferenceQDyLoRALinear

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()


def case(M=6, N=32, K=128, R=16, device="cpu", dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    packed, qs = bnbF.quantize_4bit(rnd(N, K, scale=0.05), blocksize=64, compress_statistics=True, quant_type="nf4")
    ranks = torch.tensor([(3 * i) % R + 1 for i in range(M)], device=device)
    return dict(x=rnd(M, K), weight=packed, quant_state=qs, bias=rnd(N) if bias else None,
                lora_A=rnd(R, K, scale=0.1), lora_B=rnd(N, R, scale=0.1), ranks=ranks)


def forward_backward(c, update="frozen", backend=None, op=None):
    """(y, dx, dA, dB) through qdylora_linear (or `op` directly) on fresh leaves."""
    x, A, B = (c[k].detach().clone().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    args = (x, c["weight"], c["quant_state"], c["bias"], A, B, c["ranks"], 8.0, update)
    y = op(*args, None) if op else qdylora_linear(*args, backend=backend)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, A.grad, B.grad


def reference(c, update="frozen"):
    return forward_backward(c, update, op=ReferenceQDyLoRALinear.apply)


def ours(recorded) -> list:
    return [w for w in recorded if "self-check" in str(w.message)]


@pytest.fixture
def fresh():
    selfcheck.reset()
    yield
    selfcheck.reset()


# ---------------------------------------------------------------------------------------------
# in this process: a stand-in kernels module


class Kernels(types.SimpleNamespace):
    """What the dispatcher uses of qdylora_kernels.function; counts calls of the op."""

    def __init__(self, op):
        super().__init__(calls=0)
        self._op = op

    def unsupported(self, *args, **kwargs):
        return None

    def triton_qdylora_linear(self, *args):
        self.calls += 1
        return self._op(*args)


def wrong(*args):
    return ReferenceQDyLoRALinear.apply(*args) * 1.01  # 1% off: beyond fp32's tolerance


def broken(*args):
    raise RuntimeError("PTX assembly failed: ptxas fatal")


@pytest.fixture
def kernels(monkeypatch, fresh):
    """Install a stand-in kernels module that 'auto' picks on the CPU; returns a setter."""
    monkeypatch.delenv("QDYLORA_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_auto_backend", lambda device: "triton")

    def install(op):
        k = Kernels(op)
        monkeypatch.setattr(dispatch, "_triton_impl", lambda: k)
        return k

    return install


def test_a_correct_kernel_is_probed_once_per_variant_and_then_used(kernels):
    k = kernels(ReferenceQDyLoRALinear.apply)
    c = case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            forward_backward(c)
    # probe: reference + stand-in in each update mode (2 calls); then the 3 real calls
    assert k.calls == 2 + 3
    assert [v["ok"] for v in selfcheck.report()] == [True]
    forward_backward(case(M=80))  # the tiled path is another variant: probed once more
    assert k.calls == 5 + 2 + 1 and len(selfcheck.report()) == 2


@pytest.mark.parametrize("fault,cause", [(wrong, "differs from the reference"),
                                         (broken, "RuntimeError: PTX assembly failed")])
def test_a_faulty_kernel_warns_once_and_the_reference_runs_from_then_on(kernels, fault, cause):
    k = kernels(fault)
    c, c_gemm = case(), case(M=80, seed=1)
    with pytest.warns(UserWarning) as rec:
        got = [forward_backward(c) for _ in range(3)] + [forward_backward(c_gemm)]
    assert len(ours(rec)) == 1 and cause in str(ours(rec)[0].message)
    assert "reference path" in str(ours(rec)[0].message)
    assert k.calls == 1  # the probe stopped at the first mismatch; nothing after it used the kernel
    want, want_gemm = reference(c), reference(c_gemm)
    for g in got[:3]:
        for a, b in zip(g, want):
            assert torch.equal(a, b)
    for a, b in zip(got[3], want_gemm):
        assert torch.equal(a, b)
    assert [v["ok"] for v in selfcheck.report()] == [False]


@pytest.mark.parametrize("fault,cause", [(wrong, "y differs"), (broken, "PTX assembly failed")])
def test_forcing_triton_raises_instead_of_falling_back(kernels, monkeypatch, fault, cause):
    kernels(fault)
    monkeypatch.setenv("QDYLORA_BACKEND", "triton")
    with pytest.raises(BackendError, match=cause):
        forward_backward(case())
    with pytest.raises(BackendError, match="QDYLORA_BACKEND=triton"):
        forward_backward(case())  # the verdict stands: raised again, not re-probed or skipped
    monkeypatch.delenv("QDYLORA_BACKEND")
    with pytest.raises(BackendError, match=cause):
        forward_backward(case(), backend="triton")


def test_probe_leaves_rng_grad_mode_and_autocast_alone(kernels):
    kernels(ReferenceQDyLoRALinear.apply)
    c = case()
    rng = torch.get_rng_state()
    with torch.inference_mode():
        x = c["x"].clone()
        y = qdylora_linear(x, c["weight"], c["quant_state"], c["bias"], c["lora_A"], c["lora_B"], c["ranks"], 8.0)
        assert torch.is_inference_mode_enabled() and not y.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    assert [v["ok"] for v in selfcheck.report()] == [True]


def test_unsupported_calls_fall_back_without_probing(kernels):
    k = kernels(wrong)
    k.unsupported = lambda *a, **kw: "in_features 96 is not a multiple of 64"
    c = case()
    with pytest.warns(UserWarning, match="cannot run this call"):
        got = forward_backward(c)
    assert k.calls == 0 and selfcheck.report() == []
    for a, b in zip(got, reference(c)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# the real kernels in the interpreter (child process)


@pytest.mark.skipif(INTERPRETER, reason="this is the parent of the interpreter run")
def test_real_kernels_in_the_interpreter():
    """This file's interpreter tests, in a child Python where triton is imported under the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("QDYLORA_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "interp"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


interp = pytest.mark.skipif(not INTERPRETER, reason="runs in the child with TRITON_INTERPRET=1")


@pytest.fixture
def real(monkeypatch, fresh):
    """The real kernels (interpreter), picked by 'auto' on the CPU."""
    from qdylora_kernels import function

    assert function.INTERPRET
    monkeypatch.delenv("QDYLORA_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_auto_backend", lambda device: "triton")
    monkeypatch.setattr(dispatch, "_triton_impl", lambda: function)
    return function


@interp
def test_interp_real_kernels_pass_and_are_used(real):
    c = case(M=5, N=48, K=128, R=64)
    calls = []
    op = real.triton_qdylora_linear

    def counted(*a):
        calls.append(1)
        return op(*a)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selfcheck.check(real, c["x"], c["quant_state"], c["bias"], None, strict=True)  # probe the real op
        real.triton_qdylora_linear = counted
        got = forward_backward(c)
    assert calls == [1] and [v["ok"] for v in selfcheck.report()] == [True]
    for a, b in zip(got, reference(c)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@interp
def test_interp_broken_kernel_falls_back_once(real, monkeypatch):
    op = real.triton_qdylora_linear
    monkeypatch.setattr(real, "triton_qdylora_linear", lambda *a: op(*a) * 1.01)
    c = case(M=5, N=48, K=128, R=64)
    with pytest.warns(UserWarning) as rec:
        got = [forward_backward(c), forward_backward(c)]
    assert len(ours(rec)) == 1 and "y differs from the reference" in str(ours(rec)[0].message)
    for g in got:
        for a, b in zip(g, reference(c)):
            assert torch.equal(a, b)
    monkeypatch.setenv("QDYLORA_BACKEND", "triton")
    with pytest.raises(BackendError, match="y differs"):
        forward_backward(c)


@interp
def test_interp_raising_kernel_names_the_error(real, monkeypatch):
    monkeypatch.setattr(real, "triton_qdylora_linear", broken)
    monkeypatch.setenv("QDYLORA_BACKEND", "triton")
    with pytest.raises(BackendError, match="RuntimeError: PTX assembly failed"):
        forward_backward(case(M=5, N=48, K=128, R=64))


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 4096], ids=["split", "gemm"])
def test_gpu_selfcheck_passes_in_bf16_and_costs_under_a_second(M, fresh):
    from qdylora_kernels import function

    c = case(M=M, N=4096, K=4096, R=64, device="cuda", dtype=torch.bfloat16, bias=False)
    assert selfcheck.check(function, c["x"], c["quant_state"], None, None, strict=True) is None  # compiles
    selfcheck.reset()
    t = time.perf_counter()
    assert selfcheck.check(function, c["x"], c["quant_state"], None, None, strict=True) is None
    seconds = time.perf_counter() - t
    assert seconds < 1.0, f"probe took {seconds:.2f} s after compilation"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_broken_kernel_falls_back(monkeypatch, fresh):
    from qdylora_kernels import function

    op = function.triton_qdylora_linear
    monkeypatch.delenv("QDYLORA_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_triton_impl", lambda: types.SimpleNamespace(
        unsupported=function.unsupported, triton_qdylora_linear=lambda *a: op(*a) * 1.1))
    c = case(M=80, N=256, K=256, R=64, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="self-check"):
        got = forward_backward(c)
    for a, b in zip(got, reference(c)):
        assert torch.equal(a, b)
