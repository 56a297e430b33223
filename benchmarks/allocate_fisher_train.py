"""fisher-train: per-module ranks from statistics gathered while training, against the uniform rank of the same run.

Trains `--rank-per module` runs (--rank-per example: the default rule) with benchmarks/allocate.py's settings (seeds --seeds, on --seed's data split and
held-out set) with `--fisher-steps` covering every step and a checkpoint every --window steps. The sums are additive,
so the statistics of the last W steps are the final ones minus those of checkpoint-(steps - W). For every window W and
budget R: held-out loss of the pattern `qdylora allocate --score fisher-train` chooses (its default --min-rank) minus
that of the uniform rank R of the same run, and the seconds the allocation took. The collection's cost is timed
separately: --cost-steps training steps of a fresh run with and without collection, alternated --cost-repeats times.
Beside it, when --compare holds allocate_calibration's results on the same runs: fisher from 64 calibration examples.

    python benchmarks/allocate_fisher_train.py --seeds 2 --work-dir DIR --keep-runs --train-only   # one run per process
    python benchmarks/allocate_fisher_train.py --seeds 2,3 --work-dir DIR --adapters DIR           # the study

Writes benchmarks/results/allocate_fisher_train_{steps}_{rank-per}.{json,md,png}. The committed ones: `--rank-per module`
(--window 40; trained with the first, float64 version of the hook) and `--rank-per example --window 20`, each with
`--seeds 2,3 --budgets 1,2,4,8`, then `--cost-only` with nothing else running.
allocate_fisher_train_160_module_rmax09.*: `--rank-per module --r-max-prob 0.9 --window 20 --seeds 2,3
--budgets 1,2,4,8,64 --cost-repeats 0`, then `--cost-only` with nothing else running.
allocate_fisher_train_160_module_rmax05.* / _rmax075.*: the same with `--r-max-prob 0.5` / `0.75` (0.75: `--budgets
1,2,4,8`), without `--cost-only`.
allocate_fisher_train_400_example.*: `--steps 400 --rank-per example --window 50 --seeds 2,3 --cost-repeats 0` (the
collection's cost per collected step is the 160-step file's).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocate as bench  # noqa: E402
import allocate_study as study  # noqa: E402
from allocate_runs import attach_qdylora  # noqa: E402
from alpaca_arms import train_arm  # noqa: E402

COMPARE = bench.RESULTS / "allocate_calibration_160_module_fisher.json"
COST_LABEL = "the op hands x A^T and dy B to the collector (observe), nothing else running"


def parse_args(argv=None) -> argparse.Namespace:
    p = bench.sub_parser(__doc__)
    p.add_argument("--seeds", default="2,3", help="seeds of the runs")
    p.add_argument("--rank-per", default="module", choices=("module", "example"),
                   help="the runs' rank rule (example: the CLI's default, every row at r_max)")
    p.add_argument("--window", type=int, default=40, help="a checkpoint every W steps: the windows W, 2W, ...")
    p.add_argument("--train-only", action="store_true", help="train (and keep) the runs, measure nothing")
    p.add_argument("--cost-steps", type=int, default=12, help="steps per timed arm of the cost measurement")
    p.add_argument("--cost-repeats", type=int, default=2, help="alternations of the timed arms (0: no timing)")
    p.add_argument("--compare", default=str(COMPARE), help="allocate_calibration results on the same runs")
    p.add_argument("--cost-only", action="store_true",
                   help="measure the collection cost again into the existing results file (the code changed)")
    own, args = bench.parse_sub(p, argv)
    for k in ("window", "train_only", "cost_steps", "cost_repeats", "compare", "cost_only"):
        setattr(args, k, getattr(own, k))
    args.seeds, args.main = bench.ints(own.seeds), own.rank_per
    if args.stem == bench.STEM:
        args.stem = f"allocate_fisher_train_{args.steps}_{args.main}"
    if args.smoke:
        args.seeds, args.budgets, args.window, args.cost_steps, args.cost_repeats = [0], [1, 2], 2, 4, 1
    return args


def run_name(args, seed: int) -> str:
    return f"{args.main}-{args.update}_{args.steps}_{seed}"


def trained_run(args, base, tok, dataset, seed: int) -> tuple[Path, dict]:
    """(run folder, training record): taken from --adapters when it holds the run with its statistics, else trained
    into --work-dir."""
    name = run_name(args, seed)
    for root in [r for r in (args.adapters, args.work_dir) if r]:
        run = Path(root) / name
        if (run / "adapter" / "fisher_stats.safetensors").is_file() and run.with_name(name + ".json").is_file():
            return run, json.loads(run.with_name(name + ".json").read_text())
    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
    model = attach_qdylora(copy.deepcopy(base), run_args, args.main, seed)
    arm = train_arm(name, model, tok, dataset, run_args, fisher_steps=args.steps, save_steps=args.window,
                    save_total_limit=args.steps // args.window + 1)
    arm.pop("ranks_sampled", None)
    Path(args.work_dir, name + ".json").write_text(json.dumps(arm))
    return Path(args.work_dir) / name, arm


def window_stats(run: Path, steps: int, window: int) -> dict[int, dict]:
    """{W: the statistics of the last W steps} for W = window, 2 window, ..., steps (final minus a checkpoint)."""
    from qdylora.train.fisher_stats import read_stats

    final = read_stats(run / "adapter")
    out = {steps: final}
    for w in range(window, steps, window):
        early = read_stats(run / f"checkpoint-{steps - w}" / "adapter")
        out[w] = {k: final[k] - early[k] for k in ("grad", "outer", "at_config", "tokens")}
        out[w].update(names=final["names"], steps=final["steps"][final["steps"] >= steps - w])
    return dict(sorted(out.items()))


def measure_run(args, base, held, run: Path) -> dict:
    """Per budget: the uniform rank's held-out loss and, per window, the fisher-train pattern's."""
    from qdylora.adapters.attach import module_layers, qdylora_config_of
    from qdylora.adapters.files import load_adapter
    from qdylora.allocate.greedy import default_min_rank, greedy_allocate
    from qdylora.allocate.scores import fisher_train_scores

    model = load_adapter(copy.deepcopy(base), run / "adapter").eval()
    layers = module_layers(model)
    names, cfg = list(layers), qdylora_config_of(model)
    costs = {n: layer.in_features + layer.out_features for n, layer in layers.items()}
    total = sum(costs.values())
    stats = window_stats(run, args.steps, args.window)
    out = {}
    for R in args.budgets:
        floor = default_min_rank(R * total, costs, cfg)
        patterns, seconds = {}, {}
        for w, s in stats.items():
            t0 = time.perf_counter()
            patterns[w] = greedy_allocate(fisher_train_scores(s, costs, cfg, R), R * total, floor)
            seconds[w] = time.perf_counter() - t0
        configs = [[R] * len(names)] + [[patterns[w][m] for m in names] for w in stats]
        losses = bench.heldout_losses(model, held, configs)
        out[str(R)] = {"uniform": round(losses[0], 5), "by_window": {
            str(w): {"heldout": round(loss, 5), "delta": round(loss - losses[0], 5), "seconds": round(seconds[w], 3),
                     "stats_tokens": int(stats[w]["tokens"][0]),
                     **bench.pattern_view(patterns[w], costs)}
            for w, loss in zip(stats, losses[1:])}}
        print(f"  R={R}: " + ", ".join(f"W={w} {v['delta']:+.4f}" for w, v in out[str(R)]["by_window"].items()),
              flush=True)
    return out


def collection_cost(args, base, tok, dataset) -> dict:
    """Seconds per training step with and without collecting (median over the arms' steps after the first two), the
    same ratio per repeat (its spread is the timing noise), and the seconds spent inside the collector's hooks as a
    share of the collecting arms' training time (the same cost, measured without the noise of comparing two runs)."""
    from qdylora.train import read_log
    from qdylora.train.fisher_stats import FisherCollector

    inside = [0.0]

    def timed(fn):
        def call(*a):
            t0 = time.perf_counter()
            fn(*a)
            inside[0] += time.perf_counter() - t0
        return call

    observer, logits_hook = FisherCollector._observer, FisherCollector._logits_hook
    per, medians, on_seconds = {"off": [], "on": []}, {"off": [], "on": []}, 0.0
    try:
        FisherCollector._observer = lambda self, i, layer: timed(observer(self, i, layer))
        FisherCollector._logits_hook = lambda self, *a: timed(logits_hook)(self, *a)
        for rep in range(args.cost_repeats):
            for arm, fisher in (("off", 0), ("on", args.cost_steps)):
                run_args = argparse.Namespace(**{**vars(args), "seed": 0})
                model = attach_qdylora(copy.deepcopy(base), run_args, args.main, 0)
                name = f"cost_{arm}_{rep}"
                train_arm(name, model, tok, dataset, run_args, steps=args.cost_steps, fisher_steps=fisher)
                elapsed = [r["elapsed_s"] for r in read_log(Path(args.work_dir) / name)]
                steps = [b - a for a, b in zip(elapsed[1:], elapsed[2:])]
                per[arm] += steps
                medians[arm].append(statistics.median(steps))
                if arm == "on":
                    on_seconds += elapsed[-1]
    finally:
        FisherCollector._observer, FisherCollector._logits_hook = observer, logits_hook
    off, on = statistics.median(per["off"]), statistics.median(per["on"])
    return {"step_seconds_off": round(off, 3), "step_seconds_on": round(on, 3), "overhead": round(on / off - 1, 4),
            "overhead_per_repeat": [round(a / b - 1, 4) for a, b in zip(medians["on"], medians["off"])],
            "inside_share": round(inside[0] / on_seconds, 4), "steps_timed": {k: len(v) for k, v in per.items()}}


def summarise(res: dict) -> dict:
    runs = list(res["runs"].values())
    out = {"per_budget": {}, "percent_of_training": {}}
    first = runs[0]["budgets"]
    for R in first:
        out["per_budget"][R] = {}
        for w in first[R]["by_window"]:
            d = [r["budgets"][R]["by_window"][w]["delta"] for r in runs]
            out["per_budget"][R][w] = {"mean_delta": round(sum(d) / len(d), 5), "spread": round(max(d) - min(d), 5)}
    cost = res.get("cost")
    for w in first[next(iter(first))]["by_window"]:
        alloc = [a["by_window"][w]["seconds"] / r["train_seconds"] for r in runs for a in r["budgets"].values()]
        share = int(w) / res["config"]["steps"]
        out["percent_of_training"][w] = {
            "allocation": round(100 * sum(alloc) / len(alloc), 4),
            "collection": round(100 * cost["overhead"] * share, 2) if cost else None,
            "collection_inside": round(100 * cost["inside_share"] * share, 2) if cost and "inside_share" in cost
            else None}
    return out


def compared(res: dict) -> dict:
    """allocate_calibration's fisher deltas at N = 64 on the same runs, when its uniform losses are these runs'."""
    path = Path(res["config"].get("compare") or "")
    if not path.is_file():
        return {}
    other = json.loads(path.read_text())
    out = {}
    for key, run in res["runs"].items():
        theirs = other["runs"].get(key)
        if not theirs:
            continue
        same = all(abs(theirs["budgets"][R]["uniform"] - run["budgets"][R]["uniform"]) < 1e-4
                   for R in run["budgets"] if R in theirs["budgets"])
        out[key] = {R: theirs["budgets"][R]["by_size"].get("64", {}).get("delta") for R in run["budgets"]
                    if R in theirs["budgets"]} if same else "different runs"
    return out


def markdown(res: dict) -> str:
    runs = res["runs"]
    cfg = res["config"]
    summary = res["summary"]
    windows = list(next(iter(summary["per_budget"].values())))
    rule = "`--rank-per module`" if cfg["main"] == "module" else "default-rule (every row at r_max)"
    if cfg.get("r_max_prob") is not None:
        rule += f" `--r-max-prob {cfg['r_max_prob']}`"
    lines = [f"# fisher-train: ranks from statistics gathered while training ({res['machine']})", "",
             f"{cfg['model']}; {rule} runs, {cfg['steps']} steps x batch {cfg['batch_size']}, seeds "
             + ", ".join(str(r["seed"]) for r in runs.values()) + f"; held-out: {cfg['n_heldout']} examples. Cells: "
             "held-out loss of the fisher-train pattern (statistics of the last W steps, `qdylora allocate`'s "
             "default --min-rank) minus the uniform rank R of the same run, per seed (negative: the pattern wins); "
             "the seeds' spread is the run-to-run noise of the gain.", ""]
    comp = res.get("compare") or {}
    has_comp = comp and all(isinstance(v, dict) for v in comp.values())
    lines += ["| R | uniform | " + " | ".join(f"W = {w} steps" for w in windows)
              + (" | fisher, 64 calibration examples |" if has_comp else " |"),
              "|---|---|" + "---|" * (len(windows) + (1 if has_comp else 0))]
    for R, per in summary["per_budget"].items():
        uni = " / ".join(f"{r['budgets'][R]['uniform']:.4f}" for r in runs.values())
        cells = [" / ".join(f"{r['budgets'][R]['by_window'][w]['delta']:+.4f}" for r in runs.values())
                 + f" (spread {per[w]['spread']:.4f})" for w in windows]
        if has_comp:
            cells.append(" / ".join(f"{comp[k][R]:+.4f}" for k in runs if comp[k].get(R) is not None))
        lines.append(f"| {R} | {uni} | " + " | ".join(cells) + " |")
    if comp and not has_comp:
        lines += ["", "(--compare holds other runs: its uniform losses differ, so it is not shown.)"]
    cost = res.get("cost")
    lines += ["", "| window W | loss tokens | allocation, % of training | collection, % of training (time inside the "
                  "hooks) | collection, % of training (A/B timing) |", "|---|---|---|---|---|"]
    first = next(iter(runs.values()))["budgets"]
    R0 = next(iter(first))
    for w in windows:
        pct = summary["percent_of_training"][w]
        coll = ["-" if pct.get(k) is None else f"{pct[k]:.2f}" for k in ("collection_inside", "collection")]
        lines.append(f"| {w} | {first[R0]['by_window'][w]['stats_tokens']:,} | {pct['allocation']:.4f} | "
                     + " | ".join(coll) + " |")
    if cost:
        lines += ["", f"Collection cost: {cost['step_seconds_on']:.3f} s per step with it against "
                      f"{cost['step_seconds_off']:.3f} s without (medians of {cost['steps_timed']['on']} and "
                      f"{cost['steps_timed']['off']} steps, arms alternated), {100 * cost['overhead']:+.2f}% per "
                      "collected step; the collection share above is that times W / steps."
                      + (" Per repeat: " + ", ".join(f"{100 * o:+.2f}%" for o in cost["overhead_per_repeat"])
                         + " (the timing noise of this machine). Inside the collector's hooks the collecting arms spent "
                         f"{100 * cost['inside_share']:.2f}% of their training time: the same cost without the "
                         "noise of comparing two runs." if "inside_share" in cost else "")
                      + (f" ({cost['note']}" + ("; earlier: " + ", ".join(
                          f"{100 * c['overhead']:+.2f}% ({c.get('label', 'an earlier run')}"
                          + (f"; inside the hooks {100 * c['inside_share']:.2f}%" if "inside_share" in c else "") + ")"
                          for c in res["earlier_costs"])
                          if res.get("earlier_costs")
                          else "") + ")" if cost.get("note") else "")]
    lines += ["", "Training seconds: " + ", ".join(f"seed {r['seed']} {r['train_seconds']:.0f} s" for r in runs.values())
              + "."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    series = []
    for R, per in res["summary"]["per_budget"].items():
        ws = [int(w) for w in per]
        seeds = [[run["budgets"][R]["by_window"][str(w)]["delta"] for w in ws] for run in res["runs"].values()]
        series.append((f"R = {R} (mean)", ws, [per[str(w)]["mean_delta"] for w in ws], seeds))
    study.gain_plot(path, series, "last W training steps collected",
                    "held-out loss: fisher-train pattern - uniform rank R", "fisher-train vs window (x: each seed)")


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    _, held, base, tok, dataset, res = study.start(args)
    if args.cost_only:
        res = json.loads((study.out_dir(args) / f"{args.stem}.json").read_text())
        if res.get("cost"):
            res.setdefault("earlier_costs", []).append(res["cost"])
        res["cost"] = {**collection_cost(args, base, tok, dataset), "label": COST_LABEL,
                       "note": "measured separately after the runs above (--cost-only), nothing else running"}
        study.save(res, study.out_dir(args), args.stem, summarise, markdown, plot)
        print(markdown(res))
        return 0
    runs = {seed: trained_run(args, base, tok, dataset, seed) for seed in args.seeds}
    if args.train_only:
        return 0
    for seed, (run, arm) in runs.items():
        print(f"== rank_per={args.main}, seed {seed}", flush=True)
        res["runs"][f"{args.main}_s{seed}"] = {"seed": seed, "train_seconds": arm["train_seconds"],
                                          "budgets": measure_run(args, base, held, run)}
    if args.cost_repeats:
        res["cost"] = collection_cost(args, base, tok, dataset)
    res["compare"] = compared(res)
    res["elapsed_seconds"] = round(time.perf_counter() - t_start, 1)
    study.save(res, study.out_dir(args), args.stem, summarise, markdown, plot)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
