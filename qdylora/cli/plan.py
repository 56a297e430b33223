"""`qdylora plan`: itemised GPU memory of a training run, offline, from the model's config."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import PlannerError
from ..memory import OPTIMIZERS, choose_memory_settings, parse_memory_size, plan_memory, shipped_configs


# integer flags and their defaults (None: not given)
INT_FLAGS = {"--r-max": "64", "--seq-len": "512", "--batch-size": "1", "--layers": None, "--num-gpus": "1"}


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `plan` sub-command to an argparse subparsers object."""
    names = ", ".join(shipped_configs())
    p = subparsers.add_parser(
        "plan", help="estimate GPU memory of a training run item by item (no weights downloaded)",
        description="Build the model on the meta device from its config and estimate, item by item, the GPU "
                    "memory of one QDyLoRA training step: NF4 weights with double-quantized absmax, unquantized "
                    "parameters, adapters at r_max, their gradients and optimizer state, activations, the loss's "
                    "logits, kernel transients and CUDA overheads; then say whether it fits --gpu-memory, the "
                    "largest sequence length and batch that fit, and what to shrink when it does not.",
    )
    p.add_argument("--model", required=True,
                   help=f"a shipped config ({names}), a local config.json or model folder, or a hub id "
                        "(needs network; only config.json is fetched)")
    # numbers are read in run(), so a bad one is a PlannerError (one line, exit 2) like every other bad input
    p.add_argument("--r-max", default=INT_FLAGS["--r-max"], metavar="N", help="largest adapter rank (default %(default)s)")
    p.add_argument("--seq-len", default=INT_FLAGS["--seq-len"], metavar="N",
                   help="tokens per sequence (default %(default)s)")
    p.add_argument("--batch-size", default=INT_FLAGS["--batch-size"], metavar="N",
                   help="sequences per micro-batch (default %(default)s)")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory of the GPU with its unit, e.g. 32GiB, 24GB, 80000MiB; adds the fits / doesn't-fit "
                        "verdict")
    p.add_argument("--optim", default="paged_adamw_32bit", choices=list(OPTIMIZERS) + ["adamw"],
                   help="optimizer whose state to count (default %(default)s; adamw = adamw_torch)")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="plan without gradient checkpointing (all layers' activations kept)")
    p.add_argument("--update", default="nested", choices=("frozen", "nested"),
                   help="DyLoRA update rule, as in qdylora train; frozen keeps smaller B gradients "
                        "(default %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="compute dtype and dtype of the unquantized parameters (default %(default)s)")
    p.add_argument("--kernel", default=None, choices=("triton", "reference"),
                   help="QDyLoRA op: triton (default on cuda) or the PyTorch reference (dequantizes each weight)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="plan for a GPU (adds CUDA context and allocator slack) or the CPU (default %(default)s)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated adapter targets (default: every attention and MLP linear)")
    p.add_argument("--num-gpus", default=INT_FLAGS["--num-gpus"], metavar="N",
                   help="GPUs of one run; the plan is one GPU's (default %(default)s)")
    p.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"),
                   help="with --num-gpus > 1: ddp (each GPU holds the model) or fsdp (fully sharded) (default %(default)s)")
    p.add_argument("--layers", default=None, metavar="N", help="override the number of layers (same width)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan (table or JSON); exit 0 when it fits or no budget was given, 1 when it does not."""
    try:
        given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in INT_FLAGS}
        numbers = {flag[2:].replace("-", "_"): _positive_int(text, flag) for flag, text in given.items()
                   if text is not None}
        budget = None if args.gpu_memory is None else parse_memory_size(args.gpu_memory)
        plan = plan_memory(
            args.model, gpu_memory=budget, optim=args.optim, gradient_checkpointing=not args.no_gradient_checkpointing,
            dtype=args.dtype, update=args.update, kernel=args.kernel, device=args.device, strategy=args.strategy,
            target_modules=args.target_modules.split(",") if args.target_modules else None, **numbers,
        )
        chosen = choose_memory_settings(plan, plan.budget) if plan.budget is not None else None
    except PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        d = plan.to_dict()
        if chosen is not None:
            d["recommended_settings"] = chosen
        print(json.dumps(d, indent=2))
    else:
        print(plan.format_table())
        if chosen is not None:
            print(f"recommended: gradient_checkpointing={chosen['gradient_checkpointing']} optim={chosen['optim']} "
                  f"({chosen['reason']})")
    return 0 if plan.fits in (True, None) else 1


def _positive_int(text: str, flag: str) -> int:
    """The value of an integer flag, or a PlannerError naming the flag."""
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < 1:
        raise PlannerError(f"{flag} {text!r} must be a positive integer (a whole number >= 1), e.g. {flag} "
                           f"{INT_FLAGS[flag] or 8}")
    return value
