"""How much calibration data an allocation needs: held-out gain over the uniform rank per calibration size.

On benchmarks/allocate.py's main runs (the default rule, or --main's, at seeds 0 and 1; its settings, data split and 64
held-out examples), the score's pattern (`taylor` by default) at each budget of average rank R is chosen from the
first N training examples for every N in --sizes and compared on held-out loss with the uniform rank R of the
same run. Each allocation (gradient pass, scores, greedy) is timed: its cost grows with N, against the run's training time.
`--reference r_max` scores at the full rank instead of R (what gradients collected while training would give);
`--score gradnorm` measures HeteroLoRA's per-module on/off score instead, `--score fisher` the second-order one;
`--main module` the `--rank-per module` runs.
The size `held` chooses the pattern on the held-out examples themselves: an in-sample ceiling (the evaluation data
picks the pattern), bounding what any calibration set could get from that score's allocation on that run.

Writes benchmarks/results/allocate_calibration.{json,md,png} (--stem: other names).
allocate_calibration_400_module_{taylor,gradnorm}.*: the two 400-step `--rank-per module` runs of allocate_400_module,
`--steps 400 --adapters DIR --adapters-only --main module --budgets 1,2,4,8 --taylor-floor default --truncation prefix
--sizes 8,held --score S --stem ...` (both scores side by side).
allocate_calibration_160_module_{fisher,taylor}.*: two fresh 160-step `--rank-per module` runs, seeds 2 and 3 on seed
0's split (trained here with --keep-runs, then taken again with --adapters), `--steps 160 --main module --seed 0 --seeds 2,3
--budgets 1,2,4,8 --taylor-floor default --truncation prefix --score fisher --sizes 8,32,64` (taylor: `--sizes 8,64`).
allocate_calibration_160_example_taylor.*: the two default-rule runs of allocate_fisher_train_160_example (seeds 2, 3
on seed 0's split), `--steps 160 --main example --seed 0 --seeds 2,3 --adapters DIR --adapters-only --budgets 1,2
--taylor-floor 0 --sizes 4,8,held`.
allocate_calibration_160_example_svd.*: the same two runs sorted by singular value, `--steps 160 --main example --seed 0
--seeds 2,3 --adapters DIR --adapters-only --budgets 1,2,4,8 --taylor-floor default --truncation svd --sizes 8`.
allocate_calibration_400_example_{svd,taylor}.*: the two 400-step default-rule runs of allocate_fisher_train_400_example,
the same with `--steps 400` (taylor: as trained, `--truncation prefix --budgets 1 --taylor-floor 0`).
allocate_calibration_160_module_rmax09_svd.*: the two runs of allocate_fisher_train_160_module_rmax09, sorted,
`--steps 160 --main module --r-max-prob 0.9 --seed 0 --seeds 2,3 --adapters DIR --adapters-only --budgets 1,2,4,8
--taylor-floor default --truncation svd --sizes 8`; allocate_calibration_160_module_rmax09_taylor.*: the same runs as
trained, `--truncation prefix --budgets 1 --taylor-floor 0 --sizes 8`.
allocate_calibration_160_module_rmax05_svd.*: the same as the rmax09_svd files on the runs of
allocate_fisher_train_160_module_rmax05 (`--r-max-prob 0.5`).
allocate_calibration_400_example_svd_fisher.*: the same sorted 400-step runs, `--score fisher --sizes 8,16 --threads 2`.

    python benchmarks/allocate_calibration.py --smoke                # tiny sizes, end to end (minutes)
    python benchmarks/allocate_calibration.py --adapters DIR         # runs kept by allocate.py --keep-runs
                                                                     # (missing runs are trained: ~11 min each)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocate as bench  # noqa: E402
import allocate_study as study  # noqa: E402

STEM = "allocate_calibration"
HELD = "held"  # the size that calibrates on the held-out set itself


def size_label(n) -> str:
    return "the held-out set (in-sample)" if n == HELD else f"N = {n}"


def parse_args(argv=None) -> argparse.Namespace:
    p = bench.sub_parser(__doc__)
    p.add_argument("--sizes", default="8,32,64",
                   help="calibration examples N (the first N of the training split); 'held': the held-out set itself")
    p.add_argument("--seeds", default="0,1", help="seeds of the main-rule runs (--main)")
    p.add_argument("--reference", default="R", choices=("R", "r_max"),
                   help="taylor's reference rank: the budget's R (qdylora allocate's) or r_max")
    p.add_argument("--score", default="taylor", choices=("taylor", "gradnorm", "fisher"),
                   help="the score to allocate by")
    own, args = bench.parse_sub(p, argv)
    args.sizes = [n if n == HELD else int(n) for n in (x.strip() for x in own.sizes.split(",")) if n]
    args.seeds = bench.ints(own.seeds)
    args.reference, args.score = own.reference, own.score
    if args.stem == bench.STEM:
        args.stem = STEM + ("" if args.score == "taylor" else f"_{args.score}")
    if args.smoke:
        args.sizes, args.seeds, args.budgets = [1, HELD], [0], [1]
    return args


def measure_run(model, train_recs, held, tok, args) -> dict:
    """Per budget: the uniform rank's held-out loss and, per calibration size, the pattern's and its seconds."""
    from qdylora.adapters.attach import module_layers, qdylora_config_of
    from qdylora.allocate.calib import calibration_batches
    from qdylora.allocate.greedy import default_min_rank

    layers = module_layers(model)
    names = list(layers)
    costs = {n: layer.in_features + layer.out_features for n, layer in layers.items()}
    total = sum(costs.values())
    out = {}
    for R in args.budgets:
        floor = default_min_rank(R * total, costs, qdylora_config_of(model)) if args.taylor_floor == "default" else 0
        patterns, seconds, tokens = {}, {}, {}
        for n in args.sizes:
            calib = held if n == HELD else calibration_batches(train_recs[:n], tok, args.max_seq_len,
                                                                args.eval_batch_size)
            reference = args.r_max if args.reference == "r_max" else R
            min_rank = 0 if args.score == "gradnorm" else floor  # gradnorm switches whole modules
            patterns[n], seconds[n] = bench.score_pattern(model, calib, R, R * total, reference, min_rank, args.score)
            tokens[n] = sum(b.tokens for b in calib)
        configs = [[R] * len(names)] + [[patterns[n][m] for m in names] for n in args.sizes]
        losses = bench.heldout_losses(model, held, configs)
        out[str(R)] = {"uniform": round(losses[0], 5), "by_size": {
            str(n): {"heldout": round(loss, 5), "delta": round(loss - losses[0], 5), "seconds": round(seconds[n], 2),
                     "calib_tokens": tokens[n], "modules_off": sum(1 for r in patterns[n].values() if r == 0)}
            for n, loss in zip(args.sizes, losses[1:])}}
        print(f"  R={R}: " + ", ".join(f"N={n} {v['delta']:+.4f} ({v['seconds']:.0f} s)"
                                       for n, v in out[str(R)]["by_size"].items()), flush=True)
    return out


def summarise(res: dict) -> dict:
    """Per budget and size: the mean gain over the seeds and its spread; per size the mean % of training time."""
    runs = list(res["runs"].values())
    out = {"per_budget": {}, "percent_of_training": {}}
    for R in runs[0]["budgets"]:
        out["per_budget"][R] = {}
        for n in runs[0]["budgets"][R]["by_size"]:
            d = [r["budgets"][R]["by_size"][n]["delta"] for r in runs if R in r["budgets"]]
            out["per_budget"][R][n] = {"mean_delta": round(sum(d) / len(d), 5), "spread": round(max(d) - min(d), 5)}
    for n in runs[0]["budgets"][next(iter(runs[0]["budgets"]))]["by_size"]:
        pct = [100 * a["by_size"][n]["seconds"] / r["train_seconds"] for r in runs if r.get("train_seconds")
               for a in r["budgets"].values()]
        if pct:
            out["percent_of_training"][n] = round(sum(pct) / len(pct), 2)
    return out


def markdown(res: dict) -> str:
    runs = res["runs"]
    sizes = list(next(iter(next(iter(runs.values()))["budgets"].values()))["by_size"])
    cfg = res["config"]
    score = cfg.get("score", "taylor")
    floor = "1 from R = 2 up (qdylora allocate's default)" if cfg.get("taylor_floor") == "default" else "0"
    how = (f"gradnorm at reference rank {cfg.get('reference', 'R')} (each module off or on at twice it)"
           if score == "gradnorm"
           else f"{score} at reference rank {cfg.get('reference', 'R')}, greedy from rank {floor}")
    cut = ", svd-sorted adapters" if cfg.get("truncation") == "svd" else ""
    rule = "default-rule" if cfg.get("main", "example") == "example" else f"--rank-per {cfg['main']}"
    if cfg.get("r_max_prob") is not None:
        rule += f" --r-max-prob {cfg['r_max_prob']}"
    lines = [f"# {score} allocation against calibration size ({res['machine']})", "",
             f"{res['config']['model']}; {rule} runs, {res['config']['steps']} steps x batch "
             f"{res['config']['batch_size']}; held-out: {res['config']['n_heldout']} examples; {how}{cut}. Cells: "
             f"held-out loss of {score}'s pattern minus the uniform rank R of the same run, per seed (negative: the "
             "pattern wins); the seeds' spread is the run-to-run noise of the gain.", "",
             "| R | uniform (" + ", ".join(f"s{r['seed']}" for r in runs.values()) + ") | "
             + " | ".join(size_label(n) for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for R, per in res["summary"]["per_budget"].items():
        uni = " / ".join(f"{r['budgets'][R]['uniform']:.4f}" for r in runs.values())
        cells = [" / ".join(f"{r['budgets'][R]['by_size'][n]['delta']:+.4f}" for r in runs.values())
                 + f" (spread {per[n]['spread']:.4f})" for n in sizes]
        lines.append(f"| {R} | {uni} | " + " | ".join(cells) + " |")
    first = next(iter(runs.values()))
    R0 = next(iter(first["budgets"]))
    lines += ["", "| calibration | response tokens | seconds per allocation (mean) | % of the run's training time |",
              "|---|---|---|---|"]
    for n in sizes:
        secs = [a["by_size"][n]["seconds"] for r in runs.values() for a in r["budgets"].values()]
        lines.append(f"| {size_label(n)} | {first['budgets'][R0]['by_size'][n]['calib_tokens']} | "
                     f"{sum(secs) / len(secs):.1f} | "
                     f"{res['summary']['percent_of_training'].get(n, '-')} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    series = []
    for R, per in res["summary"]["per_budget"].items():
        sizes = [int(n) for n in per if n != HELD]  # the in-sample ceiling is in the table only
        seeds = [[run["budgets"][R]["by_size"][str(n)]["delta"] for n in sizes] for run in res["runs"].values()]
        series.append((f"R = {R} (mean)", sizes, [per[str(n)]["mean_delta"] for n in sizes], seeds))
    score = res["config"].get("score", "taylor")
    study.gain_plot(path, series, "calibration examples N", f"held-out loss: {score} pattern - uniform rank R",
                    f"{score} allocation vs calibration size (x: each seed)")


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    train_recs, held, base, tok, dataset, res = study.start(args)
    return study.measure_runs(args, base, tok, dataset, res,
                              lambda model: measure_run(model, train_recs, held, tok, args),
                              (summarise, markdown, plot), t_start)


if __name__ == "__main__":
    sys.exit(main())
