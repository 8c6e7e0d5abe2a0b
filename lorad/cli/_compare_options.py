"""The options `lorad effect` and `lorad preview` share: both compare a LoRA with another file on a
base model loaded in this process, given as two files or as one LoRA the daemon holds.

Declared in three pieces, since each command puts its own options between them and --help lists
options in the order they were added. The help texts that differ between the two are passed in.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_inputs(p: argparse.ArgumentParser, input_help: str, base_help: str) -> None:
    """INPUT (ORIGINAL OTHER, or one PATH|ID), --base MODEL and --config FOLDER."""
    p.add_argument("input", nargs="+", metavar="INPUT", help=input_help)
    p.add_argument("--base", type=Path, metavar="MODEL", help=base_help)
    p.add_argument("--config", type=Path, metavar="FOLDER",
                   help="for a single-file checkpoint: a local diffusers config folder (model_index.json)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch sees one)")


def add_daemon_form(p: argparse.ArgumentParser, verb: str) -> None:
    """--variant and --socket, which only the PATH|ID form reads; `verb`: what is done with the
    variant ("measure", "show")."""
    p.add_argument("--variant", type=int, metavar="N",
                   help=f"PATH|ID form: the variant to {verb} (default: the active one, else the newest reduction)")
    p.add_argument("--socket", type=Path,
                   help="PATH|ID form: the daemon's socket (default: $LORAD_SOCKET, then the default path)")
