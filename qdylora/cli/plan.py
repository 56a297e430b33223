"""`qdylora plan`: itemised GPU memory of a training run, offline, from the model's config."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import PlannerError
from ..memory import OPTIMIZERS, choose_memory_settings, plan_memory, shipped_configs


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
    p.add_argument("--r-max", type=int, default=64, help="largest adapter rank (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default %(default)s)")
    p.add_argument("--gpu-memory", default=None,
                   help="memory of the GPU, e.g. 32GiB, 24GB, 80000MiB; adds the fits / doesn't-fit verdict")
    p.add_argument("--optim", default="paged_adamw_32bit", choices=list(OPTIMIZERS) + ["adamw"],
                   help="optimizer whose state to count (default %(default)s; adamw = adamw_torch)")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="plan without gradient checkpointing (all layers' activations kept)")
    p.add_argument("--update", default="frozen", choices=("frozen", "nested"),
                   help="DyLoRA update rule; frozen keeps smaller B gradients (default %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="compute dtype and dtype of the unquantized parameters (default %(default)s)")
    p.add_argument("--kernel", default=None, choices=("triton", "reference"),
                   help="QDyLoRA op: triton (default on cuda) or the PyTorch reference (dequantizes each weight)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="plan for a GPU (adds CUDA context and allocator slack) or the CPU (default %(default)s)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated adapter targets (default: every attention and MLP linear)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (same width)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan (table or JSON); exit 0 when it fits or no budget was given, 1 when it does not."""
    try:
        plan = plan_memory(
            args.model, r_max=args.r_max, seq_len=args.seq_len, batch_size=args.batch_size,
            gpu_memory=args.gpu_memory, optim=args.optim, gradient_checkpointing=not args.no_gradient_checkpointing,
            dtype=args.dtype, update=args.update, kernel=args.kernel, device=args.device,
            target_modules=args.target_modules.split(",") if args.target_modules else None, layers=args.layers,
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
