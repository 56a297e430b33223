"""The `qdylora` command line: train, export, sweep, plan (one module per command)."""

from __future__ import annotations

import argparse
import sys

from . import export, plan, sweep, train

COMMANDS = (train, export, sweep, plan)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="qdylora", description="Dynamic-rank LoRA on a 4-bit base: "
                                     "train once, use any rank.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qdylora` command; errors print one clear line, not a traceback."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from ..errors import QDyLoRAError

    try:
        return args.func(args) or 0
    except (QDyLoRAError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
