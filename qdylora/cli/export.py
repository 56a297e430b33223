"""`qdylora export`: one rank of a qdylora adapter as a plain peft LoRA."""

from __future__ import annotations


def register(sub) -> None:
    """Add the `export` sub-command."""
    p = sub.add_parser("export", help="write one rank of a qdylora adapter as a plain peft LoRA adapter")
    p.add_argument("adapter_dir", metavar="DIR", help="a qdylora adapter folder (RUN/adapter) or a run folder")
    p.add_argument("--rank", type=int, required=True, help="rank R of the exported LoRA (A[:R], B[:, :R])")
    p.add_argument("--output", required=True, help="folder for adapter_config.json + adapter_model.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from ..adapters.export import export_peft
    from ..train.run_folder import find_adapter

    src, run = find_adapter(args.adapter_dir)
    out = export_peft(src, args.rank, args.output, overwrite=args.overwrite, protect=run)
    print(f"wrote peft LoRA adapter of rank {args.rank} to {out}")
    return 0
