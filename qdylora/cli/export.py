"""`qdylora export`: a qdylora adapter at one rank or at a rank pattern as a plain peft LoRA."""

from __future__ import annotations


def register(sub) -> None:
    """Add the `export` sub-command."""
    from ..adapters.consumers import DTYPES
    from ..adapters.export import FORMATS

    p = sub.add_parser("export", help="write one rank (or a rank pattern) of a qdylora adapter as a plain peft LoRA",
                       description="Write the adapter at rank R (A[:R], B[:, :R]) or at a rank per module (a pattern "
                                   "from `qdylora allocate`) as a peft LoRA adapter that gives qdylora's output.")
    p.add_argument("adapter_dir", metavar="DIR", help="a qdylora adapter folder (RUN/adapter) or a run folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--rank", type=int, default=None, help="rank R of the exported LoRA (A[:R], B[:, :R])")
    what.add_argument("--rank-pattern", default=None, metavar="PATTERN.json",
                      help="a rank per module (JSON from `qdylora allocate`; 0 = module left out)")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="peft: peft's rank_pattern, exact in peft; uniform: every module zero-padded to one rank "
                        "with the scale folded into B, for consumers that read only r and lora_alpha (vLLM, "
                        "llama.cpp). Default: peft, or uniform with --pad-to")
    p.add_argument("--pad-to", type=int, default=None, metavar="R",
                   help="uniform format: pad every module to rank R (>= the largest rank exported), e.g. vLLM's "
                        "max_lora_rank 8, 16, 32 or 64")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="dtype of the exported tensors. Default: bf16 when the base computed in bf16 during "
                        "training (CUDA), else fp32")
    p.add_argument("--output", required=True, help="folder for adapter_config.json + adapter_model.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import json

    from ..adapters.export import EXPORT_META_NAME, export_format, export_pattern, export_peft
    from ..train.run_folder import find_adapter

    fmt = export_format(args.format, args.pad_to)
    src, run = find_adapter(args.adapter_dir)
    if args.rank_pattern is not None:
        out = export_pattern(src, args.rank_pattern, args.output, fmt, args.pad_to, overwrite=args.overwrite,
                             protect=run, dtype=args.dtype)
        what = f"rank pattern {args.rank_pattern}"
    else:
        if args.format == "uniform" and args.pad_to is None:
            fmt = "peft"  # one rank everywhere is already uniform
        out = export_peft(src, args.rank, args.output, overwrite=args.overwrite, protect=run, pad_to=args.pad_to,
                          dtype=args.dtype)
        what = f"rank {args.rank}"
    pad = f", padded to rank {args.pad_to}" if args.pad_to is not None else ""
    info = json.loads((out / EXPORT_META_NAME).read_text())
    print(f"wrote peft LoRA adapter ({fmt} format{pad}, {info['dtype']}) of {what} to {out}; base model: "
          f"{info['base_model_name_or_path']}")
    if info.get("base_model_note"):
        print(f"note: {info['base_model_note']}")
    return 0
