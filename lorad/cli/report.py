"""`lorad report`: a self-contained HTML page for one LoRA or for the whole library.

The daemon assembles the document (the `report` method, lorad.report.docs); this side renders it
(lorad.report.html) and writes the page atomically (temp file beside it, fsync, rename), so a
browser or a sync tool never sees half a page. The page is written as the user running the
command, where they asked: by default `<stem>.report.html` (one LoRA) or `library.report.html`
(--all) in the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from lorad.cli.control import _common, _scriptable, call, target_of
from lorad.errors import LoradError

LIBRARY_NAME = "library.report.html"


def default_output(doc: dict[str, Any], everything: bool) -> Path:
    if everything:
        return Path.cwd() / LIBRARY_NAME
    name = os.path.basename(str(doc["lora"]["path"]).rstrip("/")) or f"lora-{doc['lora']['id']}"
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else Path(name).stem or name
    return Path.cwd() / f"{stem}.report.html"


def report_command(args: argparse.Namespace) -> int:
    from lorad.report.html import render_library, render_lora, write_html

    if args.all == (args.target is not None):
        raise LoradError("give a LoRA (its path or id) or --all")
    if args.all:
        doc = call(args, "report", all=True)
    else:
        doc = call(args, "report", target=target_of(args.target))
    out = Path(os.path.abspath(os.path.expanduser(args.output))) if args.output else default_output(doc, args.all)
    html = render_library(doc) if args.all else render_lora(doc)
    try:
        write_html(out, html)
    except OSError as e:
        raise LoradError(f"cannot write {out}: {e.strerror or e}") from None
    if args.json:
        print(json.dumps({"path": str(out), "doc": doc}, indent=2, default=str))
    else:
        print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    help_text = "write an HTML report of one LoRA (PATH or ID) or, with --all, of the whole library"
    p = sub.add_parser("report", help=help_text, description=help_text)
    _common(p)
    p.set_defaults(func=_scriptable(report_command))
    p.add_argument("target", nargs="?", help="the LoRA's path or id")
    p.add_argument("--all", action="store_true", help="the whole library: every folder and LoRA, refused files too")
    p.add_argument("-o", "--output", help=f"the page to write (default: <stem>.report.html, or {LIBRARY_NAME} "
                                          "with --all, in the current directory)")  # fmt: skip
