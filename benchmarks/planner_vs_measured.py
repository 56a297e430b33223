"""The memory planner against a measured CPU training step, item by item, in both update modes.

For each configuration: random weights quantized to NF4, DyLoRA adapters r_max=64 in nested or
frozen mode, the steady state of a run (every adapter tensor has optimizer state) and then the
worst step (rank 64); the measurement is qdylora.memory.measure.measure_training_step, which
the planner's tests use too. Each configuration is measured --repeats times: the spread between
repeats is the run-to-run noise. The ratio is planned / measured (1.000 = exact).
Writes benchmarks/results/planner_vs_measured_cpu.{json,md,png}.

  python benchmarks/planner_vs_measured.py                     (tiny-llama, tiny-falcon, SmolLM2-135M)
  python benchmarks/planner_vs_measured.py --configs smollm2-135m --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEM = "planner_vs_measured_cpu"
TINY = ("tiny-llama", "tiny-falcon")


def measure(config: str, update: str, gc: bool, dtype_name: str, optim: str, seq: int, repeats: int) -> dict:
    """Planned and measured bytes per item and of the peak, for one configuration, `repeats` times."""
    from qdylora.memory.measure import ITEMS, measure_training_step, planned_items

    runs, seconds = [], []
    for _ in range(repeats):
        t = time.time()
        plan, m = measure_training_step(config, gc, dtype_name, seq, update=update, optim=optim)
        seconds.append(time.time() - t)
        runs.append(m)
    planned = planned_items(plan)
    rows = {}
    for k in ITEMS + ("peak",):
        values = [m[k] for m in runs]
        rows[k] = {"planned": planned[k], "measured": values[0], "ratio": planned[k] / max(values[0], 1),
                   "repeat_spread": (max(values) - min(values)) / max(values[0], 1)}
    return {"config": config, "update": update, "gradient_checkpointing": gc, "dtype": dtype_name, "optim": optim,
            "seq_len": seq, "repeats": repeats, "step_seconds": seconds, "items": rows}


def cases(configs: list[str]) -> list[tuple]:
    """(config, update, gc, dtype, optim): fp32 + 32-bit AdamW everywhere; bf16 + 8-bit AdamW on the tiny configs."""
    out = []
    for config in configs:
        for update in ("nested", "frozen"):
            for gc in (True, False):
                out.append((config, update, gc, "fp32", "paged_adamw_32bit"))
            if config in TINY:
                out.append((config, update, True, "bf16", "paged_adamw_8bit"))
    return out


def label(r: dict) -> str:
    return (f"{r['config']} {r['update']} {'gc' if r['gradient_checkpointing'] else 'no-gc'} {r['dtype']} "
            f"{r['optim'].replace('paged_adamw_', '')}")


def table(results: list[dict], header: str) -> str:
    """Markdown: planned MiB, measured MiB and ratio per item and case."""
    items = list(results[0]["items"])
    lines = [header, "", "| case | " + " | ".join(items) + " | worst |", "|---|" + "---|" * (len(items) + 1)]
    for r in results:
        cells = [f"{v['planned'] / 2**20:.2f} / {v['measured'] / 2**20:.2f} ({v['ratio']:.3f})"
                 for v in r["items"].values()]
        worst = max(abs(v["ratio"] - 1) for v in r["items"].values())
        lines.append(f"| {label(r)} | " + " | ".join(cells) + f" | {worst:.1%} |")
    spread = max(v["repeat_spread"] for r in results for v in r["items"].values())
    lines += ["", "Cells: planned MiB / measured MiB (planned / measured). Largest spread between repeats of one "
              f"case (run-to-run noise): {spread:.2%}."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Planned / measured per item, one panel per update mode, with the tests' 15% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(results[0]["items"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, update in zip(axes, ("nested", "frozen")):
        rs = [r for r in results if r["update"] == update]
        width = 0.8 / max(len(rs), 1)
        for j, r in enumerate(rs):
            xs = [i + (j - (len(rs) - 1) / 2) * width for i in range(len(items))]
            ax.bar(xs, [r["items"][k]["ratio"] for k in items], width, label=label(r).replace(f" {update}", ""))
        ax.axhspan(0.85, 1.15, color="green", alpha=0.08)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(items)), items, rotation=20)
        ax.set_title(f"{update} update")
        ax.set_ylim(0.8, 1.2)
    axes[0].set_ylabel("planned / measured")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.suptitle("Memory planner vs a measured CPU training step (green: the tests' 15% band)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny-llama,tiny-falcon,smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="measurements of each case (their spread is the noise)")
    ap.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import torch

    results = []
    for c in cases(args.configs.split(",")):
        r = measure(*c, args.seq_len, args.repeats)
        results.append(r)
        worst = max(abs(v["ratio"] - 1) for v in r["items"].values())
        print(f"{label(r):<40} " + " ".join(f"{k}={v['ratio']:.3f}" for k, v in r["items"].items())
              + f"  worst {worst:.1%}", flush=True)
    env = {"device": "cpu", "machine": platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "seq_len": args.seq_len, "r_max": 64}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{STEM}.json").write_text(json.dumps({**env, "results": results}, indent=2))
    header = (f"# Memory planner vs a measured CPU training step ({env['machine']}, torch {env['torch']})\n\n"
              f"r_max 64, rank 64 (the worst step), seq_len {args.seq_len}, batch 1, random NF4 weights; "
              "every adapter tensor has optimizer state (a run's steady state). bitsandbytes does not page on the "
              "CPU, so optimizer_state is all of it. peak: static bytes + optimizer state + the step's live-tensor "
              "peak (forward, backward, optimizer step).")
    (out / f"{STEM}.md").write_text(table(results, header))
    plot(results, out / f"{STEM}.png")
    print(f"wrote {out / STEM}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
