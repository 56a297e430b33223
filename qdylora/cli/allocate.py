"""`qdylora allocate`: per-module ranks of one adapter under a parameter budget, as a rank-pattern JSON file."""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    """Add the `allocate` sub-command."""
    from ..allocate.scores import SCORES

    p = sub.add_parser(
        "allocate", help="choose per-module ranks under a parameter budget (rank-pattern JSON)",
        description="Score every component of every adapted module on calibration data and choose how many "
                    "components each module keeps (0 = off) so that the adapter has at most the budget's "
                    "parameters (a component of module m costs in_m + out_m values). Prints the ranks per module "
                    "type and layer and the calibration loss against the uniform rank of the same budget.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder from `qdylora train` (or its adapter/ folder)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--avg-rank", type=float, default=None,
                        help="budget: the parameters of rank R on every module (may be fractional)")
    budget.add_argument("--params", type=int, default=None, help="budget: at most N adapter values")
    p.add_argument("--data", default=None, help="calibration records (.json/.jsonl: alpaca, text or chat), "
                   "e.g. part of the training data (optional with --score fisher-train: then no calibration loss)")
    p.add_argument("--output", required=True, help="the rank-pattern JSON file to write")
    p.add_argument("--score", default="taylor", choices=SCORES,
                   help="loss: measured loss of every truncation (exact, costly); taylor: |p * dL/dp| from one "
                        "backward pass; norm: each component's share of B A (data-free); gradnorm: gradient norm "
                        "per module, modules on or off; fisher: a second-order model of each module's loss per "
                        "rank from the same pass (wants --limit 64 or more); fisher-train: the same model from "
                        "statistics `qdylora train --fisher-steps N` gathered, no calibration pass "
                        "(default %(default)s)")
    p.add_argument("--min-rank", type=int, default=None,
                   help="every module keeps at least this many components (0: the allocation may switch modules "
                        "off; default: 1 when that takes at most half the budget, e.g. from --avg-rank 2 up, else 0)")
    p.add_argument("--limit", type=int, default=16, help="calibration examples used (default %(default)s)")
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="cut calibration examples to this many tokens (default: the run's --max-seq-len)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration examples per batch (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=_run_allocate)
    return p


def _run_allocate(args) -> int:
    from ..allocate.run import allocate
    from ..errors import check_int

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        check_int(flag, value, 1, flag)
    if args.max_seq_len is not None:
        check_int("--max-seq-len", args.max_seq_len, 1, "--max-seq-len")
    result = allocate(args.run, args.output, args.data, avg_rank=args.avg_rank, params=args.params,
                      score=args.score, limit=args.limit, model=args.model, max_seq_len=args.max_seq_len,
                      batch_size=args.batch_size, overwrite=args.overwrite, min_rank=args.min_rank)
    print(result.summary())
    print(f"wrote {args.output}")
    return 0
