"""The stages of scripts/gpu_check.sh: what each runs, its share of the time, its files, its summary rows, its kernel calls.

Standard library only at import: the orchestrator (gpu_check.py) imports this before the carried
wheels are installed. `launches()` (the kernel calls every stage makes, for the sm_90 compile of
the rehearsal) imports the kernels and the stage scripts when it is called.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# every test file with GPU tests (tests/test_gpu_check.py checks that none is missing)
GPU_TEST_FILES = ("tests/test_kernels.py", "tests/test_gpu_training.py", "tests/test_selfcheck.py",
                  "tests/test_load_paths.py", "tests/test_fsdp.py")
FALCON_STEPS = 4  # ranks: 64 first, then 3 drawn from 1..64


@dataclass
class Context:
    """Where a run writes and how: results folder, the GPU's tag for file names, dry run or not."""

    results: Path
    tag: str
    dry_run: bool
    python: str

    def path(self, name: str) -> Path:
        return self.results / name


@dataclass
class Stage:
    """One time-boxed step: a command, its share of the budget, the result files it writes (globs)."""

    name: str
    share: float
    target: str
    command: Callable[[Context], list[str]]
    files: Callable[[Context], list[str]]
    rows: Callable[[Context, list[Path]], list[dict]]
    env: Callable[[Context], dict] = field(default=lambda ctx: {})


def row(stage: str, result: str, target: str, met: bool | None) -> dict:
    """One line of the summary table (met None: reported, no target)."""
    return {"stage": stage, "result": result, "target": target, "met": met}


def _load(files: list[Path], suffix: str) -> dict | None:
    for f in files:
        if f.name.endswith(suffix):
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                return None
    return None


# ---------------------------------------------------------------------------------------------
# (1) environment


def _env_rows(ctx: Context, files: list[Path]) -> list[dict]:
    d = _load(files, "_env.json")
    if d is None:
        return [row("env", "no result file", "GPU visible, every import works", False)]
    v = d.get("versions", {})
    bad = [k for k, s in d.get("imports", {}).items() if s != "ok"]
    line = (f"{d.get('gpu', 'no GPU')}, driver {d.get('driver', '-')}; torch {v.get('torch', '?')} (CUDA "
            f"{v.get('cuda', '?')}), triton {v.get('triton', '?')}, transformers {v.get('transformers', '?')}, "
            f"peft {v.get('peft', '?')}, bitsandbytes {v.get('bitsandbytes', '?')}")
    if bad:
        line += f"; import failed: {', '.join(bad)}"
    rows = [row("env", line, "GPU visible, every import works", (d.get("cuda") or ctx.dry_run) and not bad)]
    checks = d.get("selfcheck", [])
    ok = bool(checks) and all(c["ok"] for c in checks)
    after = d.get("selfcheck_after_compile_s")
    text = ("passed: " if ok else "FAILED: ") + "; ".join(
        f"{c['variant'].split(',')[0]} {c['seconds']:.1f} s" if c["ok"] else c["reason"] for c in checks)
    if after is not None:
        text += f"; {after:.3f} s once compiled"
    fast = after is not None and (after < 1.0 or ctx.dry_run)
    rows.append(row("self-check", text or "not run", "passes; < 1 s once compiled", ok and fast))
    return rows


ENV = Stage(
    "env", 0.05, "GPU visible, every import works; self-check passes",
    command=lambda ctx: [ctx.python, "benchmarks/gpu_env_report.py", "--output",
                         str(ctx.path(f"gpu_check_{ctx.tag}_env.json"))] + (["--dry-run"] if ctx.dry_run else []),
    files=lambda ctx: [f"gpu_check_{ctx.tag}_env.json"],
    rows=_env_rows,
)


# ---------------------------------------------------------------------------------------------
# (2) the GPU tests


def _test_rows(ctx: Context, files: list[Path]) -> list[dict]:
    xml = next((f for f in files if f.suffix == ".xml"), None)
    target = "every -m gpu test passes"
    try:
        root = ET.parse(xml).getroot() if xml else None
    except (OSError, ET.ParseError):
        root = None
    if root is None:
        return [row("tests", "no junit file", target, False)]
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    failed = [f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    text = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    if failed:
        text += f" ({', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''})"
    # on the CPU (dry run) the CUDA-only tests skip; what runs must pass
    return [row("tests", text, target, n["failures"] + n["errors"] == 0 and passed > 0)]


TESTS = Stage(
    "tests", 0.22, "every -m gpu test passes",
    command=lambda ctx: [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--timeout=300",
                         "--junitxml", str(ctx.path(f"gpu_check_{ctx.tag}_tests.xml")), *GPU_TEST_FILES],
    files=lambda ctx: [f"gpu_check_{ctx.tag}_tests.xml"],
    rows=_test_rows,
    env=lambda ctx: {"TRITON_INTERPRET": "1", "QDYLORA_GPU_TESTS_ON_CPU": "1"} if ctx.dry_run else {},
)


# ---------------------------------------------------------------------------------------------
# (3) the kernel benchmark's acceptance subset


def _bench_rows(ctx: Context, files: list[Path]) -> list[dict]:
    d = _load(files, "_acceptance.json")
    if d is None:
        return [row("kernels", "no result file", "the four speed targets", False)]
    rows = []
    fused = [r for r in d.get("rows", []) if r.get("method") == "qdylora"]
    errs = [r["rel_err"] for r in fused if isinstance(r.get("rel_err"), (int, float))]
    right = bool(fused) and all(r.get("correct") is True for r in fused)
    rows.append(row("kernels", f"{len(fused)} configs, worst relative error {max(errs, default=float('nan')):.1e}"
                    + ("" if d.get("meta", {}).get("complete") else " (cut off)"),
                    "matches the reference (bf16: 3e-2)", right))
    by_target: dict[str, list[dict]] = {}
    for t in d.get("targets", []):
        by_target.setdefault(t["target"], []).append(t)
    for label, ts in by_target.items():
        vals = [t["value"] for t in ts if t["value"] is not None]
        met = sum(t["met"] for t in ts)
        text = (f"min {min(vals):.2f}x, median {sorted(vals)[len(vals) // 2]:.2f}x over {len(ts)} configs "
                f"({met}/{len(ts)} met)") if vals else "no timing"
        rows.append(row("kernels", text, f"{label} >= {ts[0]['need']:.2f}x", met == len(ts) and bool(vals)))
    return rows


BENCH = Stage(
    "kernels", 0.18, "M=4096 fwd+bwd vs (a), (b); M<=16 vs (b), (c)",
    command=lambda ctx: [ctx.python, "benchmarks/bench_kernels.py", "--acceptance", "--out", str(ctx.results)]
    + (["--dry-run"] if ctx.dry_run else []),
    files=lambda ctx: ["kernels_*_acceptance.json", "kernels_*_acceptance.png", "kernels_*_acceptance.csv"],
    rows=_bench_rows,
)


# ---------------------------------------------------------------------------------------------
# (4) Falcon-40B at 32 GiB


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "-"


def _fallbacks(d: dict) -> list[str]:
    return [c["reason"] for c in d.get("kernel_checks", []) if not c.get("ok")]


def _falcon_rows(ctx: Context, files: list[Path]) -> list[dict]:
    d = _load(files, ".json")
    if d is None:
        return [row("falcon-40b", "no result file", "fits 32 GiB; planner within 15%", False)]
    ranks = [s["rank"] for s in d.get("steps", [])]
    peak = d.get("peak_allocated")
    plan = d.get("planner", {}).get("peak_allocated")
    text = (f"{len(ranks)} steps at ranks {ranks}, peak {_gib(peak)} (planned {_gib(plan)}), "
            f"{d.get('tokens_per_s', 0):.0f} tok/s" + ("" if d.get("complete") else " (cut off)"))
    fb = _fallbacks(d)
    backend = d.get("kernel_backend")
    rows = [row("falcon-40b", text + (f"; kernels fell back: {fb[0]}" if fb else "")
                + ("" if backend == "triton" else f"; kernel backend {backend}"),
                "steps at ranks 1..64 incl. 64 on the Triton kernels", 64 in ranks and not fb and backend == "triton")]
    for t in d.get("targets", []):
        v = t["value"]
        rows.append(row("falcon-40b", _gib(v) if isinstance(v, (int, float)) else str(v), t["target"], t["met"]))
    return rows


FALCON = Stage(
    "falcon-40b", 0.25, "fits 32 GiB; planner within 15%",
    command=lambda ctx: [ctx.python, "benchmarks/falcon40b_32gb.py", "--output",
                         str(ctx.path(f"falcon40b_32gb_{ctx.tag}.json"))]
    + (["--dry-run"] if ctx.dry_run else ["--steps", str(FALCON_STEPS)]),
    files=lambda ctx: [f"falcon40b_32gb_{ctx.tag}.json"],
    rows=_falcon_rows,
)


# ---------------------------------------------------------------------------------------------
# (5) training throughput against peft


def _throughput_rows(ctx: Context, files: list[Path]) -> list[dict]:
    d = _load(files, ".json")
    if d is None:
        return [row("throughput", "no result file", "qdylora r=64 / peft tokens/s >= 0.95", False)]
    spread = d.get("spread_over_rounds", {})
    fb = [c for rs in d.get("runs", {}).values() for r in rs for c in _fallbacks(r)]

    def ratio(key, arm):
        v = d.get(key)
        return "-" if v is None else f"{v:.3f} (spread over {d.get('rounds')} rounds: peft " \
            f"{spread.get('peft', 0):.1%}, qdylora {spread.get(arm, 0):.1%})"

    need = d.get("ratio_target", 0.95)
    r64 = d.get("ratio_tokens_per_s_qdylora_r64_vs_peft")
    rows = [row("throughput", ratio("ratio_tokens_per_s_qdylora_r64_vs_peft", "qdylora")
                + (f"; kernels fell back: {fb[0]}" if fb else "") + ("" if d.get("complete") else " (cut off)"),
                f"{d.get('config')}: qdylora r=64 / peft tokens/s >= {need}", r64 is not None and r64 >= need and not fb),
            row("throughput", ratio("ratio_tokens_per_s_qdylora_sampled_vs_peft", "qdylora-sampled"),
                "sampled ranks (frozen) / peft tokens/s", None)]
    mem = d.get("ratio_peak_memory_qdylora_r64_vs_peft")
    rows.append(row("throughput", "-" if mem is None else f"{mem:.3f}", "peak memory qdylora r=64 / peft", None))
    for f in d.get("failures", []):
        rows.append(row("throughput", f"arm {f['arm']} round {f['round']} failed (exit {f['returncode']})",
                        "every arm runs", False))
    return rows


THROUGHPUT = Stage(
    "throughput", 0.30, "qdylora r=64 / peft tokens/s >= 0.95",
    command=lambda ctx: [ctx.python, "benchmarks/train_throughput.py", "--output", str(ctx.results)]
    + (["--dry-run"] if ctx.dry_run else ["--config", "llama-1b"]),
    files=lambda ctx: ["train_throughput_*_llama-tiny.json" if ctx.dry_run else "train_throughput_*_llama-1b.json"],
    rows=_throughput_rows,
)

STAGES = [ENV, TESTS, BENCH, FALCON, THROUGHPUT]


# ---------------------------------------------------------------------------------------------
# the kernel calls the stages make (compiled for sm_90 by the rehearsal)


def launches() -> list:
    """Every (rows, out, in, allocated rank, bias, separate x_lora, backward) call the GPU stages make, in bf16."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_kernels
    import train_throughput

    from qdylora.ops import selfcheck
    from qdylora_kernels.aot_check import Launch
    from qdylora_kernels.common import SMALL_M

    ranks = train_throughput.WARMUP_RANKS  # one per compiled kernel variant: what sampled ranks reach
    out = []
    # the self-check's probes (M, K as in selfcheck._inputs), for every variant a stage calls
    for m in (7, SMALL_M + 16):
        for bias in (False, True):
            for xl in (False, True):
                out.append(Launch(m, selfcheck.PROBE_N, 256, selfcheck.PROBE_R, bias=bias, x_lora=xl))
    # tests/test_kernels.py (GPU tests, bias, x_lora on odd M) and tests/test_selfcheck.py
    for m in (1, 16, 64, 65, 4096):
        out.append(Launch(m, 4096, 4096, 64, bias=True, x_lora=m % 2 == 1))
        out.append(Launch(m, 4096, 4096, 64, bias=True))
    # tests/test_gpu_training.py: the tiny Llama's linears (hidden 256, kv 128, mlp 512)
    for n, k in ((256, 256), (128, 256), (512, 256), (256, 512)):
        for r in (1, 17, 64):
            out.append(Launch(120, n, k, r, grads=False))
        out += [Launch(128, n, k, 9, x_lora=xl) for xl in (False, True)]
        out += [Launch(192, n, k, r) for r in ranks]
    # benchmarks/bench_kernels.py --acceptance (adapters allocated at R_ALLOC, no bias)
    for n, k in bench_kernels.SHAPES:
        for m in (1, bench_kernels.SMALL_ROWS, bench_kernels.LARGE_M):
            out.append(Launch(m, n, k, bench_kernels.R_ALLOC))
            if m != bench_kernels.LARGE_M:
                out.append(Launch(m, n, k, bench_kernels.R_ALLOC, grads=False))
    # benchmarks/falcon40b_32gb.py: falcon-40b's four linears at batch 1 x seq 512, every rank class
    for n, k in ((9216, 8192), (8192, 8192), (32768, 8192), (8192, 32768)):
        out += [Launch(512, n, k, r) for r in ranks]
    # benchmarks/train_throughput.py --config llama-1b: batch x seq rows, its linears, every rank class
    c, g = train_throughput.LLAMA_1B, train_throughput.GPU_DEFAULTS
    h, kv = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    for n, k in ((h, h), (kv, h), (c["intermediate_size"], h), (h, c["intermediate_size"])):
        out += [Launch(g["batch_size"] * g["seq_len"], n, k, r) for r in ranks]
    return out
