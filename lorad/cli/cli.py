"""The `lorad` command: one argparse tree; each command group lives in its own module of lorad.cli.

Each such module exposes `register(subparsers)`, adding its commands with
`parser.set_defaults(func=...)`; a command function takes the parsed args and returns an exit code.
Errors the user can act on are `LoradError`s: printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from lorad import __version__
from lorad.cli import control, daemon, db, effect, preview, reduce, report
from lorad.errors import LoradError

# Command groups, in the order `lorad --help` lists them. Imported, not looked up: a group that
# fails to import is an error at start, never a set of commands that silently vanish.
_GROUPS = (reduce, effect, preview, daemon, control, report, db)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorad", description="Keep LoRA folders small: rank reduction with originals kept."
    )
    parser.add_argument("--version", action="version", version=f"lorad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting take cores from everything else on a shared machine
    # (measured: 36 s instead of 1.9 s for one file with two busy cores). Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LoradError as e:
        print(f"lorad: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
