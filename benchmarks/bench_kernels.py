#!/usr/bin/env python
"""Benchmark the fused QDyLoRA kernels against the usual QLoRA stacks.

For each weight shape (N out x K in), row count M, LoRA rank r, and mode (forward, or forward +
backward), times four ways of computing y = x @ W^T + (alpha/r) (x @ A[:r]^T) @ B[:, :r]^T:

  qdylora  the fused Triton op (qdylora_kernels.triton_qdylora_linear), NF4 weight
  a        bitsandbytes dequantize_4bit + F.linear + separate LoRA matmuls (the peft recipe)
  b        bf16 dense F.linear + separate LoRA matmuls, no quantization
  c        bitsandbytes.matmul_4bit + separate LoRA matmuls (bnb's own 4-bit path)

with triton.testing.do_bench (median, L2 flushed between runs). Each config is first checked
against the PyTorch reference (qdylora.ops.reference): relative error of y (and dx, dA, dB in
forward+backward mode). Reports time, TFLOP/s, GB/s, transient memory (peak allocated during
one call above what was allocated before it), and speed ratios; writes CSV + JSON + PNG under
benchmarks/results/ named after the GPU. A failing config is recorded and the run goes on.

  python benchmarks/bench_kernels.py                # full run, a few minutes on an H100 (estimated)
  python benchmarks/bench_kernels.py --quick        # a subset, under a minute (estimated)
  python benchmarks/bench_kernels.py --acceptance   # just what the targets need: M = 4096 fwd+bwd, M <= 16
  python benchmarks/bench_kernels.py --dry-run      # CPU, Triton interpreter, tiny shapes: a smoke test

FLOPs counted: forward 2MNK + 2Mr(N+K); forward+backward 4MNK + 6Mr(N+K) (no weight gradient).
Bytes counted (GB/s): the weight as each method stores it (NF4 with its absmax: 0.516 bytes per
weight; bf16: 2), read once per forward and once more in backward, plus x and y in bf16
(and dy, dx in backward) -- a floor on the traffic, so GB/s is comparable across methods.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from kernel_cases import modes_for, SHAPES, ROWS, RANKS, MODES, METHODS, METHOD_NAMES, R_ALLOC, ALPHA, LARGE_M, SMALL_ROWS, TARGETS, TOL  # noqa: F401 (gpu_stages reads them from here)
from bench_kernels_report import CSV_FIELDS, BenchReport


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the fused QDyLoRA Triton kernels (see module docstring).")
    p.add_argument("--quick", action="store_true", help="a subset: 2 shapes, M in {1, 4096}, rank 64")
    p.add_argument("--acceptance", action="store_true",
                   help="the targets' subset: 4 shapes, rank 64, M = 4096 fwd+bwd and M in {1, 16} fwd and fwd+bwd")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test: Triton interpreter (TRITON_INTERPRET=1), tiny shapes, fp32, no GPU")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results; a temporary folder for --dry-run)")
    p.add_argument("--warmup", type=float, default=10.0, help="do_bench warmup in ms (default 10)")
    p.add_argument("--rep", type=float, default=40.0, help="do_bench repetition time in ms (default 40)")
    p.add_argument("--shapes", type=str, default=None, help="override shapes, e.g. 4096x4096,8192x28672 (N x K)")
    p.add_argument("--rows", type=str, default=None, help="override M values, e.g. 1,4096")
    p.add_argument("--ranks", type=str, default=None, help="override ranks, e.g. 8,64")
    return p.parse_args(argv)


def plan(args):
    """(shapes, rows, ranks, R allocated, dtype name, the rows standing for M = 4096) for this run."""
    if args.dry_run:
        shapes, rows, ranks, r_alloc, dtype, large = [(48, 128), (80, 192)], [1, 5, 70], [8, 16], 16, "float32", 70
        if args.acceptance:
            shapes, ranks = shapes[:1], ranks[1:]
    elif args.acceptance:
        shapes, rows, ranks, r_alloc, dtype, large = SHAPES, [1, SMALL_ROWS, LARGE_M], [64], R_ALLOC, "bfloat16", LARGE_M
    elif args.quick:
        shapes, rows, ranks, r_alloc, dtype, large = SHAPES[:2], [1, 4096], [64], R_ALLOC, "bfloat16", LARGE_M
    else:
        shapes, rows, ranks, r_alloc, dtype, large = SHAPES, ROWS, RANKS, R_ALLOC, "bfloat16", LARGE_M
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.rows:
        rows = [int(v) for v in args.rows.split(",")]
    if args.ranks:
        ranks = [int(v) for v in args.ranks.split(",")]
        r_alloc = max(r_alloc, max(ranks))
    return shapes, rows, ranks, r_alloc, dtype, large




def flops(mode, M, N, K, r):
    if mode == "fwd":
        return 2 * M * N * K + 2 * M * r * (N + K)
    return 4 * M * N * K + 6 * M * r * (N + K)


def nominal_bytes(mode, method, M, N, K):
    weight = 2 * N * K if method == "b" else N * K // 2 + N * K // 64
    act = 2 * (M * K + M * N)
    return weight + act if mode == "fwd" else 2 * (weight + act)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # must be set before triton is imported: the kernels are then run by the CPU interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or use --dry-run for the CPU smoke test", file=sys.stderr)
        return 2
    return Bench(args).run()


class Bench(BenchReport):
    def __init__(self, args):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
        import torch
        import torch.nn.functional as F

        import qdylora_kernels
        from qdylora.ops.reference import ReferenceQDyLoRALinear

        self.args, self.torch, self.F, self.bnb, self.bnbF = args, torch, F, bnb, bnbF
        self.op = qdylora_kernels.triton_qdylora_linear
        self.ref = ReferenceQDyLoRALinear.apply
        self.shapes, self.rows, self.ranks, self.r_alloc, dtype_name, self.large_m = plan(args)
        self.dtype = getattr(torch, dtype_name)
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.gpu = "cpu-interpreter" if args.dry_run else torch.cuda.get_device_name()
        tag = "".join(c if c.isalnum() else "_" for c in self.gpu).strip("_")
        suffix = "_acceptance" if args.acceptance else "_quick" if args.quick else ""
        out = args.out or (Path(tempfile.mkdtemp(prefix="bench_kernels_")) if args.dry_run
                           else Path(__file__).resolve().parent / "results")
        out.mkdir(parents=True, exist_ok=True)
        self.paths = {ext: out / f"kernels_{tag}{suffix}.{ext}" for ext in ("csv", "json", "png")}
        self.rows_out: list[dict] = []
        self.started = time.time()

    # -- timing and memory ---------------------------------------------------------------------

    def time_ms(self, fn, grads):
        torch = self.torch
        if self.args.dry_run:  # no CUDA events on CPU: a few plain runs
            times = []
            for _ in range(3):
                for t in grads:
                    t.grad = None
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        import triton.testing

        t = triton.testing.do_bench(fn, warmup=self.args.warmup, rep=self.args.rep, grad_to_none=grads,
                                    return_mode="median")
        torch.cuda.synchronize()
        return t

    def transient_bytes(self, fn, grads):
        torch = self.torch
        if self.args.dry_run:
            return float("nan")
        for t in grads:
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    # -- one weight shape ----------------------------------------------------------------------

    def make_weight(self, N, K):
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(N * 7 + K)
        w = self.randn((N, K), g, 0.02)
        packed, qs = self.bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        dense = self.bnbF.dequantize_4bit(packed, qs).to(self.dtype)  # (b) sees the same weights
        del w
        return packed, qs, dense, self.randn((self.r_alloc, K), g, 0.02), self.randn((N, self.r_alloc), g, 0.02)

    def randn(self, shape, g, scale=1.0):
        """Random values made on the device (a 28672 x 8192 tensor takes seconds on the CPU)."""
        t = self.torch.randn(shape, generator=g, device=self.device, dtype=self.torch.float32)
        return (t * scale).to(self.dtype)

    def methods(self, packed, qs, dense, A, B, r, M):
        """name -> (callable(x, A, B) -> y, the LoRA leaves it differentiates)."""
        torch, F, bnb, bnbF = self.torch, self.F, self.bnb, self.bnbF
        scale = ALPHA / r
        ranks = torch.full((M,), r, dtype=torch.long, device=self.device)
        # the baselines get adapters of exactly rank r, as peft allocates them
        A_r = A[:r].clone().requires_grad_()
        B_r = B[:, :r].contiguous().requires_grad_()
        A_full = A.clone().requires_grad_()
        B_full = B.clone().requires_grad_()

        def lora(x):
            return F.linear(F.linear(x, A_r), B_r) * scale

        return {
            "qdylora": (lambda x: self.op(x, packed, qs, None, A_full, B_full, ranks, ALPHA, "nested", None),
                        [A_full, B_full]),
            "a": (lambda x: F.linear(x, bnbF.dequantize_4bit(packed, qs)) + lora(x), [A_r, B_r]),
            "b": (lambda x: F.linear(x, dense) + lora(x), [A_r, B_r]),
            "c": (lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=qs) + lora(x), [A_r, B_r]),
        }, ranks

    def check(self, packed, qs, A, B, ranks, x, dy, mode):
        """Relative errors of the fused op against the PyTorch reference (y; dx, dA, dB in fwd+bwd)."""
        torch = self.torch
        errs = {}
        outs = []
        for fn in (self.ref, self.op):
            xs = x.detach().clone().requires_grad_(mode != "fwd")
            As = A.detach().clone().requires_grad_(mode != "fwd")
            Bs = B.detach().clone().requires_grad_(mode != "fwd")
            if mode == "fwd":
                with torch.no_grad():
                    outs.append((fn(xs, packed, qs, None, As, Bs, ranks, ALPHA, "nested", None),))
            else:
                y = fn(xs, packed, qs, None, As, Bs, ranks, ALPHA, "nested", None)
                y.backward(dy)
                outs.append((y.detach(), xs.grad, As.grad, Bs.grad))
        for name, r_, t in zip(("y", "dx", "dA", "dB"), *outs):
            r_, t = r_.float(), t.float()
            errs[name] = ((r_ - t).abs().max() / r_.abs().max().clamp_min(1e-12)).item()
            if not math.isfinite(errs[name]):
                errs[name] = float("inf")
        return errs

    # -- the run -------------------------------------------------------------------------------

    def record(self, row):
        self.rows_out.append(row)
        # written as we go: a crash (e.g. a sticky CUDA error) still leaves the rows so far
        new = not self.paths["csv"].exists() or len(self.rows_out) == 1
        with open(self.paths["csv"], "w" if new else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def run(self) -> int:
        torch = self.torch
        print(f"device: {self.gpu}; dtype {self.dtype}; shapes {self.shapes}; M {self.rows}; ranks {self.ranks}")
        for N, K in self.shapes:
            try:
                packed, qs, dense, A, B = self.make_weight(N, K)
            except Exception as e:  # e.g. out of memory: skip the shape, keep going
                self.fail_shape(N, K, e)
                continue
            for M in self.rows:
                for r in self.ranks:
                    self.run_config(N, K, M, r, packed, qs, dense, A, B)
            del packed, qs, dense, A, B
            if not self.args.dry_run:
                torch.cuda.empty_cache()
        self.finish(time.time() - self.started)
        return 0

    def fail_shape(self, N, K, e):
        print(f"  {N}x{K}: setup failed: {type(e).__name__}: {e}")
        for M in self.rows:
            for r in self.ranks:
                for mode in modes_for(M, self.large_m, self.args.acceptance):
                    for method in METHODS:
                        self.record(dict(N=N, K=K, M=M, rank=r, mode=mode, method=method,
                                         error=f"setup: {type(e).__name__}: {e}"[:300]))

    def run_config(self, N, K, M, r, packed, qs, dense, A, B):
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(M * 31 + r)
        x, dy = self.randn((M, K), g), self.randn((M, N), g, 0.1)
        for mode in modes_for(M, self.large_m, self.args.acceptance):
            label = f"{N}x{K} M={M} r={r} {mode}"
            errs, err_text = {}, ""
            try:
                ranks = torch.full((M,), r, dtype=torch.long, device=self.device)
                errs = self.check(packed, qs, A, B, ranks, x, dy, mode)
            except Exception as e:
                err_text = f"check: {type(e).__name__}: {e}"[:300]
                traceback.print_exc(limit=3)
            worst = max(errs.values()) if errs else float("nan")
            ok = bool(errs) and worst <= TOL[str(self.dtype).split(".")[-1]]
            fns, _ = (None, None)
            try:
                fns, _ = self.methods(packed, qs, dense, A, B, r, M)
            except Exception as e:
                err_text = err_text or f"setup: {type(e).__name__}: {e}"[:300]
            for method in METHODS:
                row = dict(N=N, K=K, M=M, rank=r, mode=mode, method=method, shape=f"{N}x{K}",
                           rel_err=worst if method == "qdylora" else "", correct=ok if method == "qdylora" else "",
                           error="")
                if method == "qdylora" and err_text:
                    row["error"] = err_text
                elif fns is None:
                    row["error"] = err_text
                else:
                    row.update(self.measure(fns[method], mode, method, x, dy, M, N, K, r))
                self.record(row)
            mine = self.find(N, K, M, r, mode, "qdylora")
            summary = " ".join(
                f"{m}={self.find(N, K, M, r, mode, m).get('time_ms', float('nan')):.4g}ms" for m in METHODS)
            status = "ok" if ok else ("FAIL " + (err_text or f"rel err {worst:.2e}"))
            print(f"  {label:34s} {summary}  [{status}]" + (f" ({mine['error']})" if mine.get("error") else ""),
                  flush=True)
            # the JSON too, so a run cut off by a time limit still leaves every finished config
            self.write_json(time.time() - self.started, final=False)

    def measure(self, entry, mode, method, x, dy, M, N, K, r):
        torch = self.torch
        fn, leaves = entry
        try:
            if mode == "fwd":
                xi = x

                def call():
                    with torch.no_grad():
                        return fn(xi)

                grads = []
            else:
                xi = x.detach().clone().requires_grad_()

                def call():
                    fn(xi).backward(dy)

                grads = [xi, *leaves]
            t = self.time_ms(call, grads)
            mem = self.transient_bytes(call, grads)
            return dict(time_ms=t, tflops=flops(mode, M, N, K, r) / (t * 1e-3) / 1e12,
                        gbps=nominal_bytes(mode, method, M, N, K) / (t * 1e-3) / 1e9,
                        transient_mb=mem / 2**20)
        except Exception as e:
            if not self.args.dry_run and isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            return dict(error=f"{type(e).__name__}: {e}"[:300])

    def find(self, N, K, M, r, mode, method) -> dict:
        for row in reversed(self.rows_out):
            if (row["N"], row["K"], row["M"], row["rank"], row["mode"], row["method"]) == (N, K, M, r, mode, method):
                return row
        return {}

    # -- reporting -----------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
