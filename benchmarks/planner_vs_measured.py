"""The memory planner against a measured CPU training step, item by item.

For each configuration: random weights quantized to NF4, DyLoRA adapters r_max=64 (nested
update, rank 64, so every component gets a gradient and optimizer state in one step), one
step of bitsandbytes PagedAdamW32bit (unpaged on the CPU); the measurement is
qdylora.planner_check.measure_training_step, which the planner's tests use too.
Writes benchmarks/results/planner_vs_measured_cpu.json.

  python benchmarks/planner_vs_measured.py                     (tiny-llama, tiny-falcon, SmolLM2-135M: ~5 min)
  python benchmarks/planner_vs_measured.py --configs smollm2-135m --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(config: str, gc: bool, dtype_name: str, seq: int) -> dict:
    """Planned and measured bytes per item, and the peak of one step, for one configuration."""
    from qdylora.memory.measure import ITEMS, measure_training_step

    t = time.time()
    plan, m = measure_training_step(config, gc, dtype_name, seq)
    rows = {k: {"planned": plan.item(k).bytes, "measured": m[k]} for k in ITEMS}
    rows["peak_allocated"] = {"planned": plan.peak_allocated, "measured": m["peak"]}
    for v in rows.values():
        v["ratio"] = v["planned"] / max(v["measured"], 1)
    return {"config": config, "gradient_checkpointing": gc, "dtype": dtype_name, "seq_len": seq,
            "step_seconds": time.time() - t, "items": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny-llama,tiny-falcon,smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "planner_vs_measured_cpu.json"))
    args = ap.parse_args(argv)
    results = []
    for config in args.configs.split(","):
        for gc in (True, False):
            r = measure(config, gc, "fp32", args.seq_len)
            results.append(r)
            worst = max(abs(v["ratio"] - 1) for v in r["items"].values())
            print(f"{config:<14} gc={gc!s:<5} " + " ".join(f"{k}={v['ratio']:.3f}" for k, v in r["items"].items())
                  + f"  worst {worst:.1%}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"device": "cpu", "results": results}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
