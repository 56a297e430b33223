"""Stage 1 of scripts/gpu_check.sh: the environment line, every import the stages need, and the Triton self-check.

Writes one JSON: GPU name, driver and memory (nvidia-smi), the versions and origins of torch,
triton, transformers, peft, accelerate and bitsandbytes (and which native library bitsandbytes
loaded), whether each module the GPU stages import imports, and the self-check's verdict on both
kernel paths in bf16 with its cost: first with compilation, then again once compiled.

  python benchmarks/gpu_env_report.py --output env.json            (GPU)
  python benchmarks/gpu_env_report.py --output env.json --dry-run  (CPU: the interpreter, fp32)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# what the stages import (the scripts import more lazily; the rehearsal runs them too)
IMPORTS = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "bitsandbytes.optim",
           "safetensors", "pytest", "hypothesis", "pytest_timeout", "matplotlib", "qdylora", "qdylora.train",
           "qdylora.memory", "qdylora.ops.selfcheck", "qdylora_kernels.function")
VERSIONS = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "numpy")


def nvidia_smi() -> dict:
    """GPU name, driver and memory from nvidia-smi (empty without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if not out:
        return {}
    name, driver, mem = (v.strip() for v in out[0].split(","))
    return {"gpu": name, "driver": driver, "memory": mem, "gpus": len(out)}


def selfcheck_report(dry_run: bool) -> tuple[list[dict], float | None]:
    """Probe both kernel paths (bf16 on CUDA, fp32 in the interpreter); then once more, compiled: its cost."""
    import bitsandbytes.functional as bnbF
    import torch

    from qdylora.ops import selfcheck
    from qdylora_kernels import function
    from qdylora_kernels.common import SMALL_M

    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16
    _, qs = bnbF.quantize_4bit(torch.randn(64, 256, device=device, dtype=dtype), blocksize=64,
                               compress_statistics=True, quant_type="nf4")
    calls = [torch.zeros(m, 256, device=device, dtype=dtype) for m in (1, SMALL_M + 1)]
    for x in calls:
        selfcheck.check(function, x, qs, None, None, strict=False)
    verdicts = selfcheck.report()
    if not all(v["ok"] for v in verdicts):
        return verdicts, None
    selfcheck.reset()
    t = time.perf_counter()
    for x in calls:
        selfcheck.check(function, x, qs, None, None, strict=False)
    return verdicts, (time.perf_counter() - t) / len(calls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU: the kernels in Triton's interpreter, fp32")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    report: dict = {"python": platform.python_version(), "executable": sys.executable, **nvidia_smi(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run}
    report["imports"] = {}
    for name in IMPORTS:
        try:
            importlib.import_module(name)
            report["imports"][name] = "ok"
        except Exception as e:  # recorded: the stage that needs it will fail, the others still run
            report["imports"][name] = f"{type(e).__name__}: {e}"[:300]
    versions, origins = {}, {}
    for name in VERSIONS:
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
            origins[name] = str(Path(getattr(mod, "__file__", "") or "?").parent)
    import torch

    versions["cuda"] = torch.version.cuda
    report["cuda"] = torch.cuda.is_available()
    if report["cuda"]:
        report.setdefault("gpu", torch.cuda.get_device_name(0))
        report["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        from bitsandbytes.cextension import lib

        report["bitsandbytes_library"] = getattr(getattr(lib, "_lib", None), "_name", None) or type(lib).__name__
    except Exception as e:
        report["bitsandbytes_library"] = f"{type(e).__name__}: {e}"[:200]
    report["versions"], report["origins"] = versions, origins
    try:
        report["selfcheck"], report["selfcheck_after_compile_s"] = selfcheck_report(args.dry_run)
    except Exception as e:
        report["selfcheck"] = [{"variant": "setup", "ok": False, "reason": f"{type(e).__name__}: {e}"[:300],
                                "seconds": 0.0}]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    bad = [k for k, v in report["imports"].items() if v != "ok"]
    print(f"{report.get('gpu', 'no GPU')} (driver {report.get('driver', '-')}, capability "
          f"{report.get('capability', '-')}); python {report['python']}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; bnb library {report['bitsandbytes_library']}")
    print("imports: " + ("all ok" if not bad else "FAILED " + "; ".join(f"{k}: {report['imports'][k]}" for k in bad)))
    for v in report["selfcheck"]:
        print(f"self-check {v['variant']}: {'ok' if v['ok'] else v['reason']} ({v['seconds']:.2f} s)")
    if report.get("selfcheck_after_compile_s") is not None:
        print(f"self-check once compiled: {report['selfcheck_after_compile_s']:.3f} s per variant")
    print(f"wrote {args.output}")
    return 1 if bad or not all(v["ok"] for v in report["selfcheck"]) else 0


if __name__ == "__main__":
    sys.exit(main())
