"""The Triton path checks itself: before its first use in a process, the fused op is compared with the reference.

For each kernel variant a call needs (device, dtype, the split-K or the tiled path, bias, a separate
low-rank input, nested absmax, in_features a multiple of 128: what selects different compiled
kernels), a small probe runs forward and backward through both the fused op and
`ReferenceQDyLoRALinear`, in both update modes, at per-row ranks inside a rank tile, at its
boundary, past it and at the full allocated rank. A mismatch beyond the dtype's tolerance, or any error while compiling or
launching, disables the kernels for that device and dtype for the rest of the process: one
warning names the cause and every later call takes the reference path. An explicit request for
Triton (`QDYLORA_BACKEND=triton`, `backend='triton'`) raises `BackendError` instead.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from ..errors import BackendError
from .reference import ReferenceQDyLoRALinear

# max |kernel - reference| / max |reference| per output; fp32 allows a TF32 reference (allow_tf32)
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# rows cycle through these ranks out of PROBE_R = 80 allocated (a 64-wide rank tile, looped twice):
# inside the first tile, at its boundary, just past it, and all of them
PROBE_RANKS = (5, 64, 65, 80)
PROBE_R = 80
PROBE_N = 48
OUTPUTS = ("y", "dx", "dA", "dB", "dbias", "dx_lora")


@dataclass
class Verdict:
    """What one probe found: ok, or why not; how long it took (compilation included)."""

    variant: str
    ok: bool
    reason: str | None
    seconds: float


_lock = threading.RLock()
_probing = threading.local()  # set while this thread runs a probe
_verdicts: dict[tuple, Verdict] = {}
_disabled: dict[tuple[str, torch.dtype], str] = {}  # (device, dtype) -> why the kernels are off there


def reset() -> None:
    """Forget every verdict (tests; a process otherwise checks each variant once)."""
    with _lock:
        _verdicts.clear()
        _disabled.clear()


def report() -> list[dict]:
    """Every probe run in this process so far, as JSON-ready dicts."""
    with _lock:
        return [asdict(v) for v in _verdicts.values()]


def _variant(x: torch.Tensor, quant_state, bias, x_lora, small_m: int) -> tuple:
    return (str(x.device), x.dtype, "split" if x.shape[0] <= small_m else "gemm", bias is not None,
            x_lora is not None, bool(quant_state.nested), x.shape[1] % 128 == 0)


def _describe(key: tuple) -> str:
    device, dtype, path, has_bias, has_xl, nested, k128 = key
    extras = [n for n, on in (("bias", has_bias), ("x_lora", has_xl), ("nested absmax", nested)) if on]
    return f"{path} path, {device}, {str(dtype).replace('torch.', '')}" + (f", {', '.join(extras)}" if extras else "") \
        + ("" if k128 else ", in_features % 128 != 0")


def check(kernels, x: torch.Tensor, quant_state, bias, x_lora, strict: bool) -> str | None:
    """None when the fused op may run this call (x: [rows, in]); else why not, after one warning.

    `kernels`: the qdylora_kernels.function module (its triton_qdylora_linear is probed);
    strict: raise BackendError instead of falling back.
    """
    from qdylora_kernels.common import SMALL_M

    if getattr(_probing, "active", False):
        return "the self-check is running"  # a call made from inside a probe: never the op under test
    key = _variant(x, quant_state, bias, x_lora, SMALL_M)
    where = key[:2]
    with _lock:
        reason = _disabled.get(where)
        if reason is None and key not in _verdicts:
            verdict = _probe(kernels, key)
            _verdicts[key] = verdict
            if not verdict.ok:
                reason = _disabled[where] = verdict.reason
                if not strict:
                    warnings.warn(f"qdylora: {reason}; using the PyTorch reference path on {where[0]} "
                                  f"{str(where[1]).replace('torch.', '')} for the rest of this process "
                                  "(QDYLORA_BACKEND=triton raises instead)", stacklevel=3)
    if reason is not None and strict:
        raise BackendError(f"{reason}; the Triton backend was asked for explicitly (QDYLORA_BACKEND=triton or "
                           "backend='triton'), so there is no fallback: unset it to use the PyTorch reference path")
    return reason


def _inputs(key: tuple) -> dict:
    """The probe's tensors for a variant, drawn on the CPU (the global RNG is left alone)."""
    import bitsandbytes.functional as bnbF

    device, dtype, path, has_bias, has_xl, nested, k128 = key
    from qdylora_kernels.common import SMALL_M

    M = 7 if path == "split" else SMALL_M + 16
    K = 256 if k128 else 192
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # base and low-rank terms of similar size, so an error in either shows in y
    packed, qs = bnbF.quantize_4bit(rnd(PROBE_N, K, scale=0.05), blocksize=64, compress_statistics=nested,
                                    quant_type="nf4")
    ranks = torch.tensor([PROBE_RANKS[i % len(PROBE_RANKS)] for i in range(M)], dtype=torch.long, device=device)
    return dict(x=rnd(M, K), weight=packed, quant_state=qs, bias=rnd(PROBE_N) if has_bias else None,
                lora_A=rnd(PROBE_R, K, scale=0.1), lora_B=rnd(PROBE_N, PROBE_R, scale=0.1), ranks=ranks,
                x_lora=rnd(M, K) if has_xl else None, dy=rnd(M, PROBE_N))


def _run(fn, case: dict, update: str) -> tuple:
    leaves = {k: None if case[k] is None else case[k].detach().clone().requires_grad_()
              for k in ("x", "bias", "lora_A", "lora_B", "x_lora")}
    y = fn(leaves["x"], case["weight"], case["quant_state"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
           case["ranks"], 16.0, update, leaves["x_lora"])
    y.backward(case["dy"])
    return (y.detach(),) + tuple(None if leaves[k] is None else leaves[k].grad
                                 for k in ("x", "lora_A", "lora_B", "bias", "x_lora"))


def _compare(ref: tuple, got: tuple, tol: float, update: str) -> str | None:
    for name, r, t in zip(OUTPUTS, ref, got):
        if r is None:
            continue
        if t is None or t.shape != r.shape:
            return f"{name} is {None if t is None else tuple(t.shape)}, expected {tuple(r.shape)} ({update})"
        r32, t32 = r.float(), t.float()
        if not torch.isfinite(t32).all():
            return f"{name} has non-finite values ({update})"
        err = ((r32 - t32).abs().max() / r32.abs().max().clamp_min(1e-6)).item()
        if not err <= tol:
            return f"{name} differs from the reference by {err:.1e} (tolerance {tol:.0e}, {update})"
    return None


def _probe(kernels, key: tuple) -> Verdict:
    """Fused op against the reference, forward and backward, in both update modes."""
    t0 = time.perf_counter()
    device, dtype = key[0], key[1]
    what = _describe(key)
    _probing.active = True
    try:
        # a private autograd graph: no autocast, grad on even under no_grad / inference_mode, and
        # identity saved-tensor hooks so an enclosing activation checkpoint neither packs nor
        # recomputes the probe's tensors
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(torch.device(device).type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            case = _inputs(key)
            mismatch = None
            for update in ("nested", "frozen"):
                ref = _run(ReferenceQDyLoRALinear.apply, case, update)
                got = _run(kernels.triton_qdylora_linear, case, update)
                mismatch = _compare(ref, got, TOLERANCE.get(dtype, TOLERANCE[torch.float32]), update)
                if mismatch:
                    break
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as e:  # compile or launch failure: the kernels cannot be trusted here
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return Verdict(what, False, f"the Triton kernels fail their self-check ({what}): {type(e).__name__}: {first}",
                       time.perf_counter() - t0)
    finally:
        _probing.active = False
    seconds = time.perf_counter() - t0
    if mismatch:
        return Verdict(what, False, f"the Triton kernels fail their self-check ({what}): {mismatch}", seconds)
    return Verdict(what, True, None, seconds)
