"""What a `taylor` allocation costs against the training run it comes from, both timed in this process, in turns.

benchmarks/allocate.py divides each allocation's seconds by its run's training time; for runs trained earlier
that time was measured by another process under another load. Here every round trains a fresh QDyLoRA adapter
with allocate.py's settings and the default rule for --short and then --long steps (their difference gives the
seconds per step without the fixed start-up, so a --steps run takes short + (steps - short) x per-step), then
allocates `taylor` (gradient pass, scores, greedy: what allocate.py times) on the adapter just trained at every
budget. The allocation's cost does not depend on how far the adapter was trained: the same passes run on the
same calibration tokens. Reported: each budget's share of a --steps run, median and range over the rounds.

Writes benchmarks/results/allocate_cost.{json,md,png}.

    python benchmarks/allocate_cost.py --smoke     # tiny sizes, end to end (a few minutes)
    python benchmarks/allocate_cost.py             # 3 rounds (about 20 minutes on 2 cores, 1 thread)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocate as bench  # noqa: E402
import allocate_runs  # noqa: E402
from alpaca_arms import fresh_base, split_alpaca, train_arm  # noqa: E402

STEM = "allocate_cost"


def parse_args(argv=None) -> argparse.Namespace:
    p = bench.sub_parser(__doc__)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (short run, long run, allocations)")
    p.add_argument("--short", type=int, default=20, help="optimizer steps of the short run")
    p.add_argument("--long", type=int, default=40, help="optimizer steps of the long run")
    own, args = bench.parse_sub(p, argv)
    args.rounds, args.short, args.long = own.rounds, own.short, own.long
    if args.smoke:
        args.rounds, args.short, args.long, args.budgets = 1, 2, 4, [1]
    if not 0 < args.short < args.long:
        raise SystemExit(f"--short {args.short} and --long {args.long}: need 0 < short < long")
    return args


def one_round(base, tok, dataset, calib, args) -> dict:
    """Seconds of the short and long runs and of the taylor allocation at every budget."""
    from qdylora.adapters.attach import module_layers
    runs = {}
    for steps in (args.short, args.long):
        model = allocate_runs.attach_qdylora(copy.deepcopy(base), args, args.main, args.seed)
        runs[steps] = train_arm(f"cost_{steps}", model, tok, dataset, args, steps=steps)["train_seconds"]
    model.eval()
    total = sum(layer.in_features + layer.out_features for layer in module_layers(model).values())
    alloc = {}
    for R in args.budgets:
        alloc[str(R)] = round(bench.score_pattern(model, calib, R, R * total)[1], 2)
        print(f"  taylor R={R}: {alloc[str(R)]:.1f} s", flush=True)
    per_step = (runs[args.long] - runs[args.short]) / (args.long - args.short)
    train = runs[args.short] + (args.steps - args.short) * per_step
    return {"short_s": runs[args.short], "long_s": runs[args.long], "per_step_s": round(per_step, 3),
            "train_s": round(train, 1), "taylor_s": alloc,
            "percent": {R: round(100 * s / train, 3) for R, s in alloc.items()}}


def summarise(rounds: list[dict], budgets: list[int]) -> dict:
    """Per budget: median, min and max of the share of the training run over the rounds."""
    out = {}
    for R in map(str, budgets):
        vals = [r["percent"][R] for r in rounds]
        secs = [r["taylor_s"][R] for r in rounds]
        out[R] = {"median_percent": statistics.median(vals), "min_percent": min(vals), "max_percent": max(vals),
                  "median_seconds": statistics.median(secs)}
    steps = [r["per_step_s"] for r in rounds]
    out["per_step_s"] = {"median": statistics.median(steps), "min": min(steps), "max": max(steps)}
    return out


def markdown(res: dict) -> str:
    cfg, s = res["config"], res["summary"]
    lines = [f"# Cost of a taylor allocation against its training run ({res['machine']})", "",
             f"SmolLM2-135M-Instruct NF4, Alpaca, QDyLoRA rank_per={cfg['main']}: batch {cfg['batch_size']}, max "
             f"{cfg['max_seq_len']} tokens, r_max {cfg['r_max']}; calibration: the first {cfg['calib']} training "
             f"examples ({cfg['calib_tokens']} response tokens; batches of rows x positions "
             f"{', '.join('x'.join(map(str, b)) for b in cfg.get('calib_batches', []))}). "
             f"{len(res['rounds'])} round(s) in one process; each "
             f"trains {cfg['short']} and {cfg['long']} steps, so a {cfg['steps']}-step run takes short + "
             f"({cfg['steps']} - {cfg['short']}) x per-step, then times the allocation (gradient pass, scores, "
             "greedy) at every budget.", "",
             f"Seconds per training step: median {s['per_step_s']['median']:.2f} "
             f"(range {s['per_step_s']['min']:.2f}-{s['per_step_s']['max']:.2f}).", "",
             f"| avg rank R | taylor s (median) | % of a {cfg['steps']}-step run: median | min | max |",
             "|---|---|---|---|---|"]
    for R in map(str, cfg["budgets"]):
        b = s[R]
        lines.append(f"| {R} | {b['median_seconds']:.1f} | {b['median_percent']:.2f}% | {b['min_percent']:.2f}% | "
                     f"{b['max_percent']:.2f}% |")
    lines += ["", "Per round:", "", "| round | short s | long s | per step s | run s | " +
              " | ".join(f"R={R} %" for R in cfg["budgets"]) + " |", "|---" * (5 + len(cfg["budgets"])) + "|"]
    for i, r in enumerate(res["rounds"]):
        lines.append(f"| {i} | {r['short_s']:.1f} | {r['long_s']:.1f} | {r['per_step_s']:.2f} | {r['train_s']:.0f} | "
                     + " | ".join(f"{r['percent'][str(R)]:.2f}" for R in cfg["budgets"]) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = res["config"]["budgets"]
    s = res["summary"]
    med = [s[str(R)]["median_percent"] for R in budgets]
    lo = [m - s[str(R)]["min_percent"] for R, m in zip(budgets, med)]
    hi = [s[str(R)]["max_percent"] - m for R, m in zip(budgets, med)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar([str(R) for R in budgets], med, yerr=[lo, hi], fmt="o", capsize=4, label="taylor (median, range)")
    ax.axhline(2.0, color="grey", linestyle="--", label="2% target")
    ax.set_xlabel("average rank R of the budget")
    ax.set_ylabel(f"% of a {res['config']['steps']}-step run")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from qdylora.allocate.calib import calibration_batches
    from qdylora.data import build_dataset

    torch.set_num_threads(args.threads)
    train_recs, _ = split_alpaca(args.alpaca, args.heldout, args.seed)
    base, tok = fresh_base()
    dataset = build_dataset(train_recs, tok, args.max_seq_len)
    calib = calibration_batches(train_recs[: args.calib], tok, args.max_seq_len, args.calib)
    rounds = []
    for i in range(args.rounds):
        print(f"round {i}", flush=True)
        rounds.append(one_round(base, tok, dataset, calib, args))
    cfg = {k: getattr(args, k) for k in ("steps", "short", "long", "batch_size", "max_seq_len", "r_max", "main",
                                         "calib", "budgets", "threads", "seed")}
    cfg["calib_tokens"] = sum(b.tokens for b in calib)
    cfg["calib_batches"] = [list(b.ids.shape) for b in calib]
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                      f"{args.threads} thread(s)", "config": cfg, "rounds": rounds,
           "summary": summarise(rounds, args.budgets)}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{STEM}.json").write_text(json.dumps(res, indent=1))
    (out / f"{STEM}.md").write_text(markdown(res))
    plot(res, out / f"{STEM}.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
