"""`qdylora sweep`: evaluate one adapter at many ranks (table, JSON, CSV, plot)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..eval.sweep import TASKS


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `sweep` sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "sweep", help="evaluate an adapter at many ranks (table, json, csv, plot)",
        description="Evaluate one QDyLoRA adapter at each rank (and the base model without adapter as a "
                    "reference), print a table and write sweep_<task>.json, .csv and .png.",
    )
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="adapter folder written by `qdylora train` (or its run folder)")
    p.add_argument("--ranks", default=None,
                   help="ranks to evaluate, comma-separated or ranges, e.g. 1,2,4,8 or 1-64 "
                        "(default: r_min, the powers of two in between and r_max: 1,2,4,...,64 for r 1..64)")
    p.add_argument("--task", default="default", choices=TASKS,
                   help="mmlu: multiple choice accuracy (QLoRA's prompt format, all ranks in batched passes); loss: "
                        "mean response-token loss / perplexity on a held-out file; default: exact match on the "
                        "embedded task; lm-eval: any lm-evaluation-harness task, lm-eval's own numbers "
                        "(default %(default)s)")
    p.add_argument("--data", default=None,
                   help="mmlu: QLoRA JSONL, cais/mmlu json/jsonl/parquet file or folder, or a hub name; loss: a "
                        "held-out alpaca/text/chat file; default: optional records file (else the embedded held-out set)")
    p.add_argument("--shots", type=int, default=0,
                   help="mmlu: in-context examples of the same subject, the first K of MMLU's dev split when there "
                        "is one (--shots-data, or dev files in a --data folder), else drawn from the evaluated split "
                        "(default 0)")
    p.add_argument("--shots-data", default=None, metavar="DEV",
                   help="mmlu: the dev split (file or folder) the k-shot examples come from")
    p.add_argument("--lm-eval-tasks", default=None, metavar="NAME[,NAME...]",
                   help="lm-eval: the lm-evaluation-harness tasks to run (needs `pip install qdylora[eval]`)")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="lm-eval: a folder of local task YAML files (e.g. dataset_path: json with local data_files)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="lm-eval: in-context examples (default: each task's own)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate at most N items (mmlu: taken round-robin over subjects; lm-eval: per task)")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward pass (default %(default)s)")
    p.add_argument("--batched-ranks", action="store_true",
                   help="evaluate all ranks in one forward pass with per-row ranks (same numbers, fewer passes)")
    p.add_argument("--model", default=None,
                   help="base model (hub id, folder or .gguf); default: the one recorded in the adapter")
    p.add_argument("--output", default=None, help="folder for sweep_<task>.* (default: ADAPTER_DIR)")
    p.add_argument("--max-seq-len", type=int, default=512, help="loss: cut examples to this many tokens")
    p.add_argument("--padding-side", choices=("left", "right"), default=None,
                   help="pad batches on this side (default: the tokenizer's); results are the same either way")
    p.add_argument("--no-base", action="store_true", help="skip the base-model reference row")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing k-shot examples (default 0)")
    p.add_argument("--rank-pattern", default=None, metavar="P1.json,P2.json",
                   help="rank-pattern files (from `qdylora allocate`) to evaluate beside the ranks; the plot then "
                        "shows the metric against adapter parameters")
    p.set_defaults(func=run)
    return p


def harness_options(args: argparse.Namespace) -> dict | None:
    """The lm-eval options of --task lm-eval (None for the other tasks, which refuse them)."""
    given = [f for f, v in (("--lm-eval-tasks", args.lm_eval_tasks), ("--include-path", args.include_path),
                            ("--num-fewshot", args.num_fewshot)) if v is not None]
    if args.task != "lm-eval":
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --task lm-eval")
        return None
    return {"tasks": (args.lm_eval_tasks or "").split(","), "include_path": args.include_path,
            "num_fewshot": args.num_fewshot}


def run(args: argparse.Namespace) -> int:
    """Run a sweep from parsed arguments; prints the table and where the files went."""
    from ..allocate.pattern import split_paths
    from ..eval.sweep import parse_ranks, sweep

    ranks = parse_ranks(args.ranks) if args.ranks is not None else None
    result = sweep(args.adapter_dir, ranks, task=args.task, data=args.data, shots=args.shots,
                   limit=args.limit, batch_size=args.batch_size, batched_ranks=args.batched_ranks, model=args.model,
                   output=args.output, include_base=not args.no_base, max_seq_len=args.max_seq_len,
                   seed=args.seed, padding_side=args.padding_side, patterns=split_paths(args.rank_pattern),
                   shots_data=args.shots_data, harness=harness_options(args))
    print(result.table())
    print(f"total {result.total_seconds:.1f} s; wrote " + ", ".join(result.settings.get("files", [])))
    return 0
