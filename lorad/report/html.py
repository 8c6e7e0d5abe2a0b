"""Static HTML reports: one LoRA (`render_lora`) or the whole library (`render_library`).

Pure functions from plain JSON-able dicts to one self-contained HTML string: inline CSS, inline
SVG charts, and (library page only) a small inline script that sorts and filters the table. Nothing
is loaded from anywhere: no URL appears in the output, and a Content-Security-Policy forbids every
fetch and every script but our own (by hash). Every string from the data is escaped; file names
are the user's. `write_html` writes a page atomically (temp file beside it, fsync, rename).

This module is the face: the pages are made in lora_page.py (one LoRA), library_page.py (the
library) and preview_page.py (`lorad preview`), from the shell in _page.py, the charts in
_charts.py and the block grouping in blocks.py.

Input contracts (extra keys are ignored):

render_lora(doc), doc = {
  "generated_at": str,
  "lora": {"id": int, "path": str, "folder": str, "policy": str | None},
  "variants": [{"id", "kind": "original"|"reduced", "active": bool, "method", "param", "bytes",
                "sha256", "autov2", "autov3", "blake3" (or None), "fro_retained_file" (or None),
                "fro_retained_min" (the module min), "created_at", "rank_rule", "serve", "servers": [str],
                "decision": {"activate", "reason", "saving", "fro_retained_file"} | None,
                "effect_retained", "effect_retained_min" (the latest measured effect on a base model,
                mean and worst sample; None: never measured), "effect": {"kind", "base", "base_sha256",
                "samples_id", "measured_at", "kl_mean", ...} | None}],
  "modules": [{"name", "kind", "rank_in", "rank_out", "fro_retained", "rel_error", "params_in",
               "params_out", "skipped": str | None}],   # of the variant `shown_variant_id`
  "shown_variant_id": int | None,
  "spectra": [{"name", "values": [float, ...] (descending), "cut": int (directions kept)}],
  "preview": optional, lorad.report.preview's input plus "variant_id" and "reference_id" (the variants
             rendered; labels come from "variants"): adds the Preview section (`lorad preview`),
}

render_preview(doc), the standalone page of `lorad preview ORIGINAL OTHER`, doc = {
  "generated_at": str, "original": str, "other": str (the two files' paths),
  "preview": lorad.report.preview's input,
}

render_library(doc), doc = {
  "generated_at": str,
  "folders": [{"path", "loras", "bytes_original", "bytes_active"}],
  "loras": [{"id", "path", "folder", "active_kind", "method", "param", "bytes_original",
             "bytes_active", "fro_retained_file" (or None), "effect_retained", "effect_retained_min"
             (or None: the active variant's effect never measured), "refused": str | None}],
}
"""

from __future__ import annotations

import os
from pathlib import Path

from lorad._atomic import replacing
from lorad.report.blocks import block_of, group_by_block
from lorad.report.library_page import render_library
from lorad.report.lora_page import OPEN_MODULE_LIMIT, render_lora
from lorad.report.preview_page import render_preview

# The pages live in their own modules; importers (lorad.cli, the tests) keep importing them from here.
__all__ = ["render_lora", "render_library", "render_preview", "write_html", "block_of", "group_by_block",
           "OPEN_MODULE_LIMIT"]


def write_html(path: str | os.PathLike[str], html: str) -> Path:
    """Write `html` to `path` atomically: a temp file beside it, fsynced, renamed over it."""
    target = Path(path)
    data = html.encode("utf-8")
    with replacing(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    return target
