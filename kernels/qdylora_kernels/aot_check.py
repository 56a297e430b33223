"""Compile the kernels for an NVIDIA target without a GPU: `python -m qdylora_kernels.aot_check`.

Runs the real launch wrappers (forward.py, backward.py) on small CPU tensors with a stand-in
driver that only compiles (Triton's warmup path) for sm_90, so every configuration the wrappers
pick for the given row counts and dtypes goes through the whole Triton -> PTX -> cubin
pipeline. Reports registers, spills and shared memory per kernel (from ptxas -v). Catches what
the CPU interpreter cannot: layouts, inline PTX, register pressure. Needs the ptxas that ships
with Triton's pip wheel, not a GPU; must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile

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


def compile_all(ms=(1, 16, 64, 65, 256, 4096), dtypes=(torch.bfloat16, torch.float16, torch.float32),
                arch: int = 90, N: int = 256, K: int = 256, R: int = 64, sass: bool = False) -> list[dict]:
    """Compile what the wrappers launch for each row count and dtype; one record per compiled kernel."""
    import bitsandbytes.functional as bnbF

    from . import backward, common, forward
    from .nf4 import nf4_weight

    assert not common.INTERPRET, "run without TRITON_INTERPRET: the interpreter compiles nothing"
    records, seen = [], set()
    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, kernel.hash)
        if key not in seen:
            seen.add(key)
            consts = {k: v for k, v in kwargs.items() if k.isupper() and k != "LUT_ASM"}
            info = _ptxas_info(kernel.asm["ptx"], arch)
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
        g = torch.Generator().manual_seed(0)
        for dtype in dtypes:
            packed, qs = bnbF.quantize_4bit(torch.randn(N, K, generator=g).to(dtype), blocksize=64,
                                            compress_statistics=True, quant_type="nf4")
            w = nf4_weight(packed, qs)
            A = torch.randn(R, K, generator=g).to(dtype)
            B = torch.randn(N, R, generator=g).to(dtype)
            bias = torch.randn(N, generator=g).to(dtype)
            for M in ms:
                x = torch.randn(M, K, generator=g).to(dtype)
                dy = torch.randn(M, N, generator=g).to(dtype)
                ranks = torch.full((M,), R, dtype=torch.long)
                h, gr = torch.zeros(M, R, dtype=dtype), torch.zeros(M, R, dtype=dtype)
                if M <= common.SMALL_M:
                    forward.splitk_forward(x, x, A, ranks, B, bias, w, 16.0)
                    backward.splitn_dx(dy, A, B, ranks, w, 16.0, separate_lora=False)
                    backward.splitn_dx(dy, A, B, ranks, w, 16.0, separate_lora=True)
                else:
                    forward.fused_forward(x, h, ranks, B, bias, w, 16.0)
                    backward.fused_dx(dy, gr, ranks, A, w, 16.0, with_lora=True)
                    backward.fused_dx(dy, gr, ranks, A, w, 16.0, with_lora=False)
    finally:
        JITFunction.run = original_run
        driver._active = previous
    return records


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
    bad = 0
    for r in records:
        flag = "SPILLS" if r["spills"] > 0 else ""
        print(f"{r['kernel']:22s} warps={r['warps']} stages={r['stages']} lut={r['lut']:6s} regs={r['regs']:3d} "
              f"spills={r['spills']:5d} smem={r['shared']:6d}  "
              + " ".join(f"{k}={v}" for k, v in r.items() if k.startswith(("BLOCK", "HAS", "SEP"))) + f" {flag}")
        if "loop_instrs" in r:
            print(f"{'':22s} main loop: {r['loop_instrs']} SASS instructions ({r['loop_mix']})")
        bad += r["regs"] < 0
    print(f"{len(records)} kernels compiled for sm_{args.arch}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
