"""`qdylora sort`: a trained adapter with its components sorted by singular value, as a new adapter folder."""

from __future__ import annotations


def register(sub) -> None:
    """Add the `sort` sub-command."""
    p = sub.add_parser("sort", help="write an adapter with every module's components sorted by singular value "
                                    "(rank b = the best rank-b approximation of the full adapter)",
                       description="Re-express each module's update by its singular vectors, largest first, and "
                                   "write the result as a new qdylora adapter folder: the full adapter is unchanged, "
                                   "rank b becomes its best rank-b approximation (what `train --truncation svd` "
                                   "writes). Meant for runs that train every row at r_max (the default rule); "
                                   "sweep, allocate and export take the new folder; sweep both to choose.")
    p.add_argument("adapter_dir", metavar="DIR", help="a qdylora adapter folder (RUN/adapter) or a run folder")
    p.add_argument("--output", required=True, help="folder for the sorted adapter (outside the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=_run_sort)


def _run_sort(args) -> int:
    from ..adapters.svd_sort import sort_adapter
    from ..train.run_folder import find_adapter

    src, run = find_adapter(args.adapter_dir)
    out = sort_adapter(src, args.output, overwrite=args.overwrite, protect=run)
    print(f"wrote the svd-sorted adapter to {out} (rank b now runs at alpha/r_max: the best rank-b approximation)")
    return 0
