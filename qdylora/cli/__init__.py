"""The `qdylora` command line: train, export, sweep, plan, allocate, sort (one module per command).

Every error a user can cause prints one line `error: ...` (what is wrong and what to do) and exits
with code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import allocate, export, plan, sort, sweep, train

COMMANDS = (train, export, sweep, plan, allocate, sort)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command and where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand."""
    parser = OneLineParser(prog="qdylora", description="Dynamic-rank LoRA on a 4-bit base: train once, use any rank.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qdylora` command; errors print one clear line, not a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # a usage error (code 2) is returned like every other error; --help exits
            if e.code in (0, None):
                raise
            return int(e.code)
        from ..errors import QDyLoRAError

        try:
            return args.func(args) or 0
        except (QDyLoRAError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a full disk or a read-only folder outside the places that say so themselves
            where = f" ({e.filename})" if e.filename else ""
            print(f"error: {e.strerror or e}{where}; free space or choose a writable folder", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
