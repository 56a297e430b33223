"""Compile the kernels for an NVIDIA target without a GPU: `python -m qdylora_kernels.aot_check`.

Runs the real op (function.py: forward, then backward) on CPU tensors with a stand-in driver that
only compiles (Triton's warmup path) for sm_90, so every kernel the op launches for a given call
goes through the whole Triton -> PTX -> cubin pipeline. A call is a `Launch` (rows, out, in,
allocated rank, dtype, bias, a separate low-rank input); out and in are replaced by small
stand-ins with the same residues (Triton specialises integer arguments on == 1 and on
divisibility by 16; in_features % 128 picks a tile), so the compiled kernels are the ones the
real sizes get, without allocating them. Reports registers, spills and shared memory per kernel (from ptxas -v). Catches what
the CPU interpreter cannot: layouts, inline PTX, register pressure. Needs the ptxas that ships
with Triton's pip wheel, not a GPU; must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction


class _CompileOnlyDriver:
    """Just enough of a Triton driver for JITFunction.run(warmup=True) to compile for `target`."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _ptxas_info(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return dict(regs=int(regs[-1]) if regs else -1, spills=int(spills[-1]) if spills else -1)


def _loop_mix(cubin: bytes) -> dict:
    """SASS of the kernel's main loop (the first loop with MMA instructions): size and top opcodes."""
    import collections
    import os

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in
           re.finditer(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[0-9T]+ )?([A-Z0-9_.]+)([^;]*);", sass)]
    at = {a: i for i, (a, _, _) in enumerate(ins)}
    for i, (a, op, rest) in enumerate(ins):
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < a and int(t.group(1), 16) in at:
            body = ins[at[int(t.group(1), 16)]: i + 1]
            if any(o.startswith(("HGMMA", "HMMA")) for _, o, _ in body):
                mix = collections.Counter(o.split(".")[0] for _, o, _ in body)
                return dict(loop_instrs=len(body), loop_mix=", ".join(f"{k}:{v}" for k, v in mix.most_common(8)))
    return {}


@dataclass(frozen=True)
class Launch:
    """One call of the op: M rows, N out, K in features, R allocated rank; backward too when grads."""

    M: int
    N: int
    K: int
    R: int = 64
    dtype: torch.dtype = torch.bfloat16
    bias: bool = False
    x_lora: bool = False
    grads: bool = True

    def stand_in(self) -> "Launch":
        """The same call with small N and K of the same residues: the same compiled kernels."""
        n = 128 + self.N % 16 if self.N > 1 else 1
        k = 256 if self.K % 128 == 0 else 192
        return Launch(self.M, n, k, self.R, self.dtype, self.bias, self.x_lora, self.grads)


def _nf4_stand_in(N: int, K: int, dtype: torch.dtype):
    """(packed weight, quant state) with bitsandbytes' NF4 layout and nested absmax, values unset."""
    state2 = SimpleNamespace(absmax=torch.zeros(max(1, N * K // 64 // 256)), code=torch.zeros(256), blocksize=256)
    qs = SimpleNamespace(quant_type="nf4", blocksize=64, shape=torch.Size([N, K]), nested=True, dtype=dtype,
                         absmax=torch.zeros(N * K // 64, dtype=torch.uint8), code=torch.zeros(16), offset=0.0,
                         state2=state2)
    return torch.zeros(N * K // 2, 1, dtype=torch.uint8), qs


def _call(launch: Launch) -> None:
    """Run the op's forward (and backward) for `launch` on zero-filled CPU tensors."""
    from . import function

    c = launch.stand_in()
    packed, qs = _nf4_stand_in(c.N, c.K, c.dtype)
    reason = function.unsupported(torch.zeros(c.M, c.K, dtype=c.dtype), packed, qs, None,
                                  torch.zeros(c.R, c.K, dtype=c.dtype), torch.zeros(c.N, c.R, dtype=c.dtype),
                                  None, None)
    assert reason in (None, "x is on cpu, the kernels need CUDA"), f"{launch}: {reason}"

    def leaf(*shape):
        return torch.zeros(*shape, dtype=c.dtype, requires_grad=c.grads)

    x, A, B = leaf(c.M, c.K), leaf(c.R, c.K), leaf(c.N, c.R)
    bias = leaf(c.N) if c.bias else None
    xl = leaf(c.M, c.K) if c.x_lora else None
    ranks = torch.full((c.M,), c.R, dtype=torch.long)
    with torch.set_grad_enabled(c.grads):
        y = function.triton_qdylora_linear(x, packed, qs, bias, A, B, ranks, 16.0, "nested", xl)
        if c.grads:
            y.backward(torch.zeros_like(y))


def compile_launches(launches, arch: int = 90, sass: bool = False, configs_only: bool = False,
                     ptxas_report: bool = True) -> list[dict]:
    """Compile every kernel the op launches for each call in `launches`; one record per distinct kernel.

    configs_only: one compile per kernel configuration (constexprs, warps, stages), not per
    specialisation of the integer arguments (fewer compiles, a faster check).
    ptxas_report: registers and spills from a second `ptxas -v` (else -1: unknown).
    """
    from . import common

    assert not common.INTERPRET, "run without TRITON_INTERPRET: the interpreter compiles nothing"
    records, seen, configs = [], set(), set()
    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        config = (self.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items() if k.isupper() or k.startswith("num_"))))
        if configs_only and config in configs:
            return None  # the wrappers ignore what a launch returns
        configs.add(config)
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, kernel.hash)
        if key not in seen:
            seen.add(key)
            consts = {k: v for k, v in kwargs.items() if k.isupper() and k != "LUT_ASM"}
            info = _ptxas_info(kernel.asm["ptx"], arch) if ptxas_report else dict(regs=-1, spills=-1)
            if sass:
                info.update(_loop_mix(kernel.asm["cubin"]))
            records.append(dict(kernel=self.fn.__name__, shared=kernel.metadata.shared,
                                warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages,
                                lut="ptx" if kwargs.get("LUT_ASM") else "gather", **info, **consts))
        return kernel

    driver = triton.runtime.driver
    previous = driver._active  # None on a machine without a GPU driver; restored as it was
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = compile_only
    try:
        for launch in dict.fromkeys(l.stand_in() for l in launches):
            _call(launch)
    finally:
        JITFunction.run = original_run
        driver._active = previous
    return records


def compile_all(ms=(1, 16, 64, 65, 256, 4096), dtypes=(torch.bfloat16, torch.float16, torch.float32),
                arch: int = 90, N: int = 256, K: int = 256, R: int = 64, sass: bool = False) -> list[dict]:
    """Compile what the op launches for each row count and dtype, with and without a separate x_lora."""
    return compile_launches([Launch(M, N, K, R, dtype, bias=True, x_lora=xl)
                             for dtype in dtypes for M in ms for xl in (False, True)], arch, sass)


def print_records(records: list[dict], arch: int) -> int:
    """One line per compiled kernel; returns how many have no register count (ptxas failed)."""
    bad = 0
    for r in records:
        flag = "SPILLS" if r["spills"] > 0 else ""
        print(f"{r['kernel']:22s} warps={r['warps']} stages={r['stages']} lut={r['lut']:6s} regs={r['regs']:3d} "
              f"spills={r['spills']:5d} smem={r['shared']:6d}  "
              + " ".join(f"{k}={v}" for k, v in r.items() if k.startswith(("BLOCK", "HAS", "SEP"))) + f" {flag}")
        if "loop_instrs" in r:
            print(f"{'':22s} main loop: {r['loop_instrs']} SASS instructions ({r['loop_mix']})")
        bad += r["regs"] < 0
    print(f"{len(records)} kernels compiled for sm_{arch} with triton {triton.__version__}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="SM version to compile for (default 90, H100)")
    p.add_argument("--quick", action="store_true", help="bf16 only, one small and one large M")
    p.add_argument("--sass", action="store_true",
                   help="also size the main loop in SASS (instructions per iteration; divide by the weights "
                        "each thread decodes per iteration, BLOCK_N*BLOCK_K/(32*warps), for the decode cost)")
    args = p.parse_args(argv)
    ms, dtypes = ((1, 4096), (torch.bfloat16,)) if args.quick else ((1, 16, 64, 65, 256, 4096),
                                                                   (torch.bfloat16, torch.float16, torch.float32))
    records = compile_all(ms, dtypes, args.arch, sass=args.sass)
    return 1 if print_records(records, args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
