"""Does keeping every module on help? `taylor` patterns with a floor (`qdylora allocate --min-rank K`) against the
plain pattern (K = 0: modules may be switched off) and the uniform rank of the same budget.

On benchmarks/allocate.py's default-rule runs (its settings, data split, 64 held-out examples and 8 calibration
examples; --steps picks the runs, e.g. the 160- or 400-step ones kept with --keep-runs), each budget of average
rank R gets one gradient pass and one pattern per floor K < R (K >= R leaves only the uniform rank). Reported: the
held-out loss of each pattern minus the uniform rank's, per seed; a floor beats noise at R when every seed's gain
is below minus the seeds' spread (allocate.py's rule).

Writes benchmarks/results/allocate_floor_<steps>.{json,md,png} (--stem: other names).

    python benchmarks/allocate_floor.py --smoke                          # tiny sizes, end to end (minutes)
    python benchmarks/allocate_floor.py --adapters DIR --steps 400       # runs kept by allocate.py --keep-runs
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


def parse_args(argv=None) -> argparse.Namespace:
    p = bench.sub_parser(__doc__)
    p.add_argument("--min-ranks", default="0,1", help="floors K to compare (0: the plain greedy)")
    p.add_argument("--seeds", default="0,1", help="seeds of the default-rule runs")
    own, args = bench.parse_sub(p, argv)
    args.min_ranks, args.seeds = bench.ints(own.min_ranks), bench.ints(own.seeds)
    if args.stem == bench.STEM:
        args.stem = f"allocate_floor_{args.steps}"
    if args.smoke:
        args.seeds, args.budgets = [0], [1, 2]
    return args


def measure_run(model, calib, held, budgets: list[int], min_ranks: list[int]) -> dict:
    """Per budget: the uniform rank's held-out loss and, per floor, the pattern's loss, gain and modules off."""
    from qdylora.adapters.attach import module_layers
    from qdylora.allocate.greedy import greedy_allocate
    from qdylora.allocate.scores import taylor_scores

    layers = module_layers(model)
    names = list(layers)
    total = sum(layer.in_features + layer.out_features for layer in layers.values())
    out = {}
    for R in budgets:
        table = taylor_scores(model, calib, R)
        floors = [k for k in min_ranks if k < R]
        patterns = {k: greedy_allocate(table, R * total, min_rank=k) for k in floors}
        losses = bench.heldout_losses(model, held, [[R] * len(names)] + [[patterns[k][m] for m in names]
                                                                          for k in floors])
        out[str(R)] = {"uniform": round(losses[0], 5), "by_floor": {
            str(k): {"heldout": round(loss, 5), "gain": round(loss - losses[0], 5),
                     "modules_off": sum(1 for r in patterns[k].values() if r == 0),
                     "max_rank": max(patterns[k].values())}
            for k, loss in zip(floors, losses[1:])}}
        print(f"  R={R}: uniform {losses[0]:.4f}, " + ", ".join(
            f"min {k}: {v['gain']:+.4f}" for k, v in out[str(R)]["by_floor"].items()), flush=True)
    return out


def summarise(res: dict) -> dict:
    """Per budget and floor: the seeds' gains, their spread and whether every gain is below minus the spread."""
    runs = list(res["runs"].values())
    out = {}
    for R in runs[0]["budgets"]:
        out[R] = {}
        for k in runs[0]["budgets"][R]["by_floor"]:
            gains = [r["budgets"][R]["by_floor"][k]["gain"] for r in runs if R in r["budgets"]]
            spread = max(gains) - min(gains)
            out[R][k] = {"gains": gains, "mean_gain": round(sum(gains) / len(gains), 5), "spread": round(spread, 5),
                         "beats_noise": len(gains) > 1 and all(g < -spread for g in gains)}
    return out


def markdown(res: dict) -> str:
    cfg, summ = res["config"], res["summary"]
    floors = sorted({k for per in summ.values() for k in per}, key=int)
    lines = [f"# taylor patterns with a floor (--min-rank) ({res['machine']})", "",
             f"{cfg['model']}; default-rule runs, {cfg['steps']} steps x batch {cfg['batch_size']}; held-out: "
             f"{cfg['n_heldout']} examples; calibration: the first {cfg['calib']} training examples. Cells: held-out "
             "loss of the pattern minus the uniform rank R of the same run, per seed (negative: the pattern wins), "
             "the seeds' spread, and 'beats noise' when every gain is below minus the spread. Min 0: the plain "
             "greedy (modules may be switched off); `qdylora allocate` uses min 1 from R = 2 on, min 0 below.", "",
             "| R | uniform (" + ", ".join(f"s{r['seed']}" for r in res["runs"].values()) + ") | "
             + " | ".join(f"min {k}" for k in floors) + " |", "|---|---|" + "---|" * len(floors)]
    for R, per in summ.items():
        uni = " / ".join(f"{r['budgets'][R]['uniform']:.4f}" for r in res["runs"].values())
        cells = []
        for k in floors:
            s = per.get(k)
            cells.append("" if s is None else " / ".join(f"{g:+.4f}" for g in s["gains"])
                         + f" (spread {s['spread']:.4f}{', beats noise' if s['beats_noise'] else ''})")
        lines.append(f"| {R} | {uni} | " + " | ".join(cells) + " |")
    lines += ["", "Modules switched off (of " + str(res["modules"]) + ") and the largest rank, per seed:", "",
              "| R | " + " | ".join(f"min {k}" for k in floors) + " |", "|---|" + "---|" * len(floors)]
    for R in summ:
        cells = []
        for k in floors:
            got = [r["budgets"][R]["by_floor"].get(k) for r in res["runs"].values()]
            cells.append(" / ".join(f"{g['modules_off']} off, max {g['max_rank']}" for g in got if g))
        lines.append(f"| {R} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    summ = res["summary"]
    series = []
    for k in sorted({k for per in summ.values() for k in per}, key=int):
        Rs = [R for R in summ if k in summ[R]]
        series.append((f"min rank {k} (mean over seeds)", [int(R) for R in Rs], [summ[R][k]["mean_gain"] for R in Rs],
                       [[run["budgets"][R]["by_floor"][k]["gain"] for R in Rs] for run in res["runs"].values()]))
    study.gain_plot(path, series, "budget: average rank R", "held-out loss: pattern - uniform rank R",
                    f"taylor patterns with a floor, {res['config']['steps']} steps (x: each seed)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from qdylora.adapters.attach import module_layers
    from qdylora.allocate.calib import calibration_batches

    t_start = time.perf_counter()
    train_recs, held, base, tok, dataset, res = study.start(args)
    calib = calibration_batches(train_recs[: args.calib], tok, args.max_seq_len, args.calib)

    def measure(model) -> dict:
        res["modules"] = len(module_layers(model))
        return measure_run(model, calib, held, args.budgets, args.min_ranks)

    return study.measure_runs(args, base, tok, dataset, res, measure, (summarise, markdown, plot), t_start)


if __name__ == "__main__":
    sys.exit(main())
