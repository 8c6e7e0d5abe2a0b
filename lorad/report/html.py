"""Static HTML reports: one LoRA (`render_lora`) or the whole library (`render_library`).

Pure functions from plain JSON-able dicts to one self-contained HTML string: inline CSS, inline
SVG charts, and (library page only) a small inline script that sorts and filters the table. Nothing
is loaded from anywhere: no URL appears in the output, and a Content-Security-Policy forbids every
fetch and every script but our own (by hash). Every string from the data is escaped; file names
are the user's. `write_html` writes a page atomically (temp file beside it, fsync, rename).

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

import base64
import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorad._atomic import replacing
from lorad.report import _svg
from lorad.report._svg import esc, fmt_bytes, fmt_count, fmt_fro, fmt_param, fmt_pct, saving
from lorad.report.preview import PREVIEW_CSS, preview_section

__all__ = ["render_lora", "render_library", "render_preview", "write_html", "block_of", "OPEN_MODULE_LIMIT"]

# Above this many modules the per-block module charts start folded (the block overview stays open).
OPEN_MODULE_LIMIT = 400

# ---------------------------------------------------------------------------------------------
# Blocks: a best-effort grouping of module names


_TOKEN = re.compile(r"[^._]+")
_SINGLE = {"block", "layer", "stage", "level", "h"}
_PLURAL = ("blocks", "layers", "stages", "levels")
_KOHYA_ROOT = re.compile(r"(lora_(?:unet|te\d*|transformer|text_encoder\d*)|lycoris_[a-z]+\d*)(?=[._])")


def block_of(name: str) -> str:
    """The block a module belongs to: its name up to and including the first block index.

    `lora_unet_input_blocks_4_1_..._to_q` -> `lora_unet_input_blocks_4`;
    `unet.down_blocks.0.attentions.1...` -> `unet.down_blocks.0`;
    `transformer.single_transformer_blocks.12.attn.to_q` -> `transformer.single_transformer_blocks.12`;
    `lora_te1_text_model_encoder_layers_0_mlp_fc1` -> `lora_te1_text_model_encoder_layers_0`;
    `unet.mid_block.attentions.0...` -> `unet.mid_block` (a block with no index);
    a name with none (`lora_unet_conv_in`) -> its family's fallback group, `lora_unet (other)`.
    """
    tokens = list(_TOKEN.finditer(name))
    for i, m in enumerate(tokens):
        word = m.group(0).lower()
        if not (word in _SINGLE or word.endswith(_PLURAL)):
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt is not None and nxt.group(0).isdigit():
            return name[: nxt.end()]
        if word == "block" and i > 0:  # mid_block / middle_block: one block without an index
            return name[: m.end()]
    root = _KOHYA_ROOT.match(name)
    if root:
        return f"{root.group(1)} (other)"
    if "." in name:
        return f"{name.split('.', 1)[0]} (other)"
    return "other"


def _natural(text: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text.lower()))


def group_by_block(modules: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """(block, its modules) in natural order of block names (input < middle < output, 2 < 10)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for m in modules:
        groups.setdefault(block_of(str(m["name"])), []).append(m)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0].endswith("(other)"), _natural(kv[0])))
    return [(b, sorted(ms, key=lambda m: _natural(str(m["name"])))) for b, ms in ordered]


# ---------------------------------------------------------------------------------------------
# Page frame

_CSS = """
:root{--bg:#fff;--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--card:#f6f8fa;--in:#c5d3e3;
--out:#2f6fdf;--keep:#1a7f64;--lost:#f2c4c4;--cut:#cf222e;--ok:#1a7f37;--okbg:#dafbe1;
--no:#9a6700;--nobg:#fff8c5;--bad:#cf222e;--badbg:#ffebe9;--grid:#e6eaef}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#9198a1;--line:#30363d;
--card:#151b23;--in:#3a4a5e;--out:#4c8dff;--keep:#3fb98f;--lost:#5c2b2e;--cut:#ff6a69;--ok:#3fb950;
--okbg:#12261e;--no:#d29922;--nobg:#272115;--bad:#f85149;--badbg:#2d1619;--grid:#21262d}}
*{box-sizing:border-box}
html{background:var(--bg);color:var(--fg)}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif}
main,header.top,footer{max-width:1180px;margin:0 auto;padding:0 24px}
header.top{padding-top:28px;padding-bottom:8px}
.brand{font-size:12px;letter-spacing:.08em;text-transform:uppercase;color:var(--muted);font-weight:600}
h1{font-size:26px;margin:2px 0 2px;word-break:break-all;line-height:1.25}
h2{font-size:18px;margin:32px 0 10px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:14px;margin:18px 0 6px;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;word-break:break-all}
h3 .sub{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,"DejaVu Sans",sans-serif;font-weight:400;color:var(--muted);margin-left:8px}
p{margin:6px 0}
.path{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;color:var(--muted);word-break:break-all;margin:0}
.meta,.muted{color:var(--muted)}
.mono,code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;margin-top:18px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.card .v{font-size:22px;font-weight:650;margin-top:2px;font-variant-numeric:tabular-nums}
.card .d{font-size:12.5px;color:var(--muted)}
.badge{display:inline-block;border-radius:999px;padding:1px 9px;font-size:12px;font-weight:600;border:1px solid transparent}
.badge.ok{color:var(--ok);background:var(--okbg);border-color:var(--ok)}
.badge.no{color:var(--no);background:var(--nobg);border-color:var(--no)}
.badge.bad{color:var(--bad);background:var(--badbg);border-color:var(--bad)}
.badge.act{color:var(--out);border-color:var(--out)}
.decision{border:1px solid var(--line);border-radius:10px;padding:10px 14px;margin:8px 0;background:var(--card)}
.decision .why{margin-top:4px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;white-space:nowrap}
tr.active td{background:color-mix(in srgb,var(--out) 9%,transparent)}
.wrap{overflow-x:auto}
dl.hashes{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:6px 0 14px}
dl.hashes dt{color:var(--muted)}
dl.hashes dd{margin:0;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px;word-break:break-all}
svg.chart{display:block;max-width:100%;height:auto;overflow:visible}
svg .t{fill:var(--fg);font-size:12px;font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,"DejaVu Sans",sans-serif}
svg .tm{fill:var(--muted);font-size:11px;font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,"DejaVu Sans",sans-serif}
svg .lbl{fill:var(--fg);font-size:11px;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
svg .num{fill:var(--fg);font-size:11px;font-variant-numeric:tabular-nums;font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,"DejaVu Sans",sans-serif}
svg .b-in{fill:var(--in)} svg .b-out{fill:var(--out)} svg .b-keep{fill:var(--keep)} svg .b-lost{fill:var(--lost)}
svg .b-skip{fill:none;stroke:var(--muted);stroke-dasharray:3 2}
svg .grid{stroke:var(--grid);stroke-width:1} svg .axis{stroke:var(--line);stroke-width:1}
svg .cut{stroke:var(--cut);stroke-width:1.5;stroke-dasharray:4 3}
svg .t-cut{fill:var(--cut);font-size:11px;font-weight:600;font-family:system-ui,-apple-system,Arial,"DejaVu Sans",sans-serif;paint-order:stroke;stroke:var(--bg);stroke-width:3px;stroke-linejoin:round}
svg .cum{stroke:var(--keep);stroke-width:2;fill:none;stroke-linejoin:round}
svg .t-keep{fill:var(--keep);font-size:11px;font-family:system-ui,-apple-system,Arial,"DejaVu Sans",sans-serif}
svg .act{fill:var(--out)} svg .row:hover .lbl{font-weight:700}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;font-size:12.5px;color:var(--muted);margin:4px 0 8px}
.legend span::before{content:"";display:inline-block;width:12px;height:10px;border-radius:2px;margin-right:6px;vertical-align:-1px;background:var(--c)}
.legend .l-in{--c:var(--in)} .legend .l-out{--c:var(--out)} .legend .l-keep{--c:var(--keep)} .legend .l-lost{--c:var(--lost)}
.legend .l-cut::before{background:none;border-left:2px dashed var(--cut);width:2px;height:12px}
.legend .l-cum::before{height:3px;vertical-align:3px;background:var(--keep)}
.spectra{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:14px}
.spec-card{border:1px solid var(--line);border-radius:10px;padding:10px 12px 6px}
.spec-card .name{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
h3.overview{font-family:inherit}
.spec-card svg.chart{width:100%}
details>summary{cursor:pointer;color:var(--muted);margin:8px 0}
details.block>summary{color:var(--fg);list-style-position:outside}
details.block>summary h3{display:inline;margin:0}
details.block{margin:14px 0}
.note{color:var(--muted);font-style:italic}
.empty{padding:14px;border:1px dashed var(--line);border-radius:10px;color:var(--muted)}
input.filter{font:inherit;padding:6px 10px;border:1px solid var(--line);border-radius:8px;background:var(--bg);color:var(--fg);width:min(360px,100%);margin:4px 0 10px}
th button{all:unset;cursor:pointer;display:block;width:100%}
th button:focus-visible{outline:2px solid var(--out);outline-offset:2px}
th button::after{content:" \\2195";opacity:.35}
th[aria-sort=ascending] button::after{content:" \\25B2";opacity:.9}
th[aria-sort=descending] button::after{content:" \\25BC";opacity:.9}
td.name{min-width:200px;overflow-wrap:anywhere} td.folder{font-size:12.5px;white-space:nowrap}
td.note{min-width:170px;color:var(--bad)} td.nowrap{white-space:nowrap}
tr.refused td{background:color-mix(in srgb,var(--bad) 7%,transparent)}
footer{color:var(--muted);font-size:12px;padding-top:24px;padding-bottom:32px}
@media print{details{display:block}details>summary{display:none}}
"""

# Sorting and filtering of `table.sortable`: no data is ever written into this script.
_SORT_JS = """
(function () {
  "use strict";
  function key(cell) {
    var v = cell.getAttribute("data-v");
    return v === null ? cell.textContent.trim() : v;
  }
  function sortBy(table, col, th) {
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir);
    var numeric = th.getAttribute("data-type") === "num";
    var sign = dir === "ascending" ? 1 : -1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (r, i) {
      return { row: r, k: key(r.cells[col]), i: i };
    });
    rows.sort(function (a, b) {
      var ea = a.k === "", eb = b.k === "";
      if (ea || eb) return ea === eb ? a.i - b.i : (ea ? 1 : -1);  // no value: always last
      var c = numeric ? Number(a.k) - Number(b.k)
                      : a.k.localeCompare(b.k, undefined, { numeric: true, sensitivity: "base" });
      return c !== 0 ? sign * c : a.i - b.i;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var b = th.querySelector("button");
      if (b) b.addEventListener("click", function () { sortBy(table, col, th); });
    });
    var input = document.querySelector("input.filter[data-for='" + table.id + "']");
    if (input) input.addEventListener("input", function () {
      var q = input.value.trim().toLowerCase();
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        r.hidden = q !== "" && r.textContent.toLowerCase().indexOf(q) < 0;
      });
    });
  });
})();
"""


def _script_hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")


def _page(title: str, body: str, script: str | None = None) -> str:
    # The policy forbids every fetch (default-src 'none') and every script but ours, by its hash:
    # an escaping mistake could neither load nor run anything.
    scripts = f"'{_script_hash(script)}'" if script else "'none'"
    csp = (f"default-src 'none'; style-src 'unsafe-inline'; script-src {scripts}; img-src data:; "
           "base-uri 'none'; form-action 'none'")  # fmt: skip
    tail = f"<script>{script}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="generator" content="lorad">'
        f"<title>{esc(title)}</title><style>{_CSS}{PREVIEW_CSS}</style></head>\n"
        f"<body>{body}{tail}</body></html>\n"
    )


def _card(key: str, value: str, detail: str = "", cid: str = "") -> str:
    """`value` and `detail` are markup (already escaped)."""
    ident = f' id="{esc(cid)}"' if cid else ""
    d = f'<div class="d">{detail}</div>' if detail else ""
    return f'<div class="card"{ident}><div class="k">{esc(key)}</div><div class="v">{value}</div>{d}</div>'


def _bytes_html(b: int | None) -> str:
    """A size for people, with the exact byte count on hover."""
    if b is None:
        return "-"
    return f'<span title="{int(b):,} bytes">{esc(fmt_bytes(b))}</span>'


def _footer(generated_at: object) -> str:
    return (f"<footer>Generated by lorad at {esc(generated_at)}. This page is self-contained: "
            "it loads nothing from anywhere.</footer>")  # fmt: skip


def _within(path: str, folder: str) -> str:
    """`path` relative to `folder` (subfolders kept: `characters/anna.safetensors`), else its name."""
    base = folder.rstrip("/") + "/" if folder else ""
    return path[len(base):] if base and path.startswith(base) and len(path) > len(base) else _name_of(path)


def _name_of(path: str) -> str:
    base = os.path.basename(path.rstrip("/")) if path else ""
    return base or path


# ---------------------------------------------------------------------------------------------
# One LoRA


def _variant_label(v: Mapping[str, Any]) -> str:
    if v.get("kind") == "original":
        return f"#{int(v['id'])} original"
    method = v.get("method") or "reduced"
    param = fmt_param(v.get("param"))
    return f"#{int(v['id'])} {method} {param}".rstrip()


def render_lora(doc: Mapping[str, Any]) -> str:
    """The report of one LoRA: sizes, the policy's decisions, variants, hashes, per-module ranks and
    retained Frobenius by block, and the spectra of its largest modules, as one HTML page."""
    lora = doc["lora"]
    variants = sorted(doc.get("variants") or [], key=lambda v: int(v["id"]))
    original = next((v for v in variants if v.get("kind") == "original"), None)
    active = next((v for v in variants if v.get("active")), None)
    shown_id = doc.get("shown_variant_id")
    shown = next((v for v in variants if shown_id is not None and int(v["id"]) == int(shown_id)), None)
    modules = list(doc.get("modules") or [])
    spectra = list(doc.get("spectra") or [])
    path = str(lora.get("path") or "")
    name = _name_of(path)

    header = (
        '<header class="top"><div class="brand">lorad report</div>'
        f'<h1 id="lora-name">{esc(name)}</h1><p class="path" id="lora-path">{esc(path)}</p>'
        f'<p class="meta">LoRA #{int(lora["id"])} · folder <span class="mono">{esc(lora.get("folder") or "-")}</span>'
        f' · policy <b>{esc(lora.get("policy") or "none")}</b> · generated {esc(doc.get("generated_at") or "-")}</p>'
        "</header>"
    )
    parts = [
        _lora_cards(original, active, shown, modules),
        _sizes_section(variants, original),
        _decision_section(variants, lora.get("policy")),
        _variants_section(variants, original),
        _preview_of(doc.get("preview"), variants),
        _modules_section(modules, shown, active, _spectra_section(spectra)),
        _hashes_section(original, active),
    ]
    body = header + "<main>" + "".join(parts) + "</main>" + _footer(doc.get("generated_at"))
    return _page(f"lorad report: {name}", body)


def _preview_of(preview: object, variants: list[Mapping[str, Any]]) -> str:
    if not isinstance(preview, Mapping):
        return ""
    by_id = {int(v["id"]): v for v in variants}

    def label(key: str, default: str) -> str:
        v = by_id.get(int(preview[key])) if preview.get(key) is not None else None
        return _variant_label(v) if v else default

    return preview_section(preview, label("reference_id", "original"), label("variant_id", "variant"))


def render_preview(doc: Mapping[str, Any]) -> str:
    """`lorad preview ORIGINAL OTHER`: a page with the Preview section of two files (no daemon)."""
    original, other = str(doc.get("original") or ""), str(doc.get("other") or "")
    header = (
        '<header class="top"><div class="brand">lorad preview</div>'
        f'<h1 id="lora-name">{esc(_name_of(other))}</h1>'
        f'<p class="path">original <span class="mono" id="preview-original">{esc(original)}</span><br>'
        f'other <span class="mono" id="preview-other">{esc(other)}</span></p>'
        f'<p class="meta">generated {esc(doc.get("generated_at") or "-")}</p></header>'
    )
    section = preview_section(doc["preview"], f"original ({_name_of(original)})", f"other ({_name_of(other)})")
    body = header + "<main>" + section + "</main>" + _footer(doc.get("generated_at"))
    return _page(f"lorad preview: {_name_of(other)}", body)


def _lora_cards(original: Mapping[str, Any] | None, active: Mapping[str, Any] | None,
                shown: Mapping[str, Any] | None, modules: list[Mapping[str, Any]]) -> str:  # fmt: skip
    ob = original.get("bytes") if original else None
    ab = active.get("bytes") if active else None
    save = saving(ob, ab)
    cards = [
        _card("Original", _bytes_html(ob), esc(_variant_label(original)) if original else "not recorded", "card-original"),
        _card("Now on disk", _bytes_html(ab), esc(_variant_label(active)) + " (active)" if active else "no active variant", "card-active"),
        _card("Saved", esc(fmt_pct(save)) if save is not None else "-",
              _bytes_html(int(ob) - int(ab)) if ob is not None and ab is not None else "", "card-saved"),
    ]  # fmt: skip
    quality = active if active and active.get("kind") == "reduced" else shown
    if quality is not None:
        label = "active" if quality is active else "not active"
        cards.append(_card("Retained Frobenius", esc(fmt_fro(quality.get("fro_retained_file"))),
                           f"whole file, {esc(_variant_label(quality))} ({label}); module min "
                           f"{esc(fmt_fro(quality.get('fro_retained_min')))}", "card-fro"))  # fmt: skip
    measured = quality if quality is not None and quality.get("effect_retained") is not None else None
    if measured is not None:
        e = measured.get("effect") or {}
        cards.append(_card("Effect retained", esc(fmt_fro(measured.get("effect_retained"))),
                           f"mean over the samples, worst {esc(fmt_fro(measured.get('effect_retained_min')))}; "
                           f"{esc(_variant_label(measured))} on {esc(_name_of(str(e.get('base') or '')) or '-')}",
                           "card-effect"))  # fmt: skip
    reduced = [m for m in modules if not m.get("skipped")]
    if modules:
        rin = [int(m["rank_in"]) for m in reduced] or [0]
        rout = [int(m["rank_out"]) for m in reduced] or [0]
        skipped = len(modules) - len(reduced)
        cards.append(_card("Modules", f"{len(reduced)} <span class=\"muted\">reduced</span>",
                           f"rank {_span(rin)} → {_span(rout)}" + (f"; {skipped} passed through" if skipped else ""),
                           "card-modules"))  # fmt: skip
    return '<section class="cards" id="summary">' + "".join(cards) + "</section>"


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _sizes_section(variants: list[Mapping[str, Any]], original: Mapping[str, Any] | None) -> str:
    if not variants:
        return '<section id="sizes"><h2>Sizes</h2><p class="empty">No variant recorded.</p></section>'
    ob = original.get("bytes") if original else None
    biggest = max(int(v.get("bytes") or 0) for v in variants) or 1
    W, label_w, bar_x, bar_w, row = 960, 230, 240, 520, 30
    body = []
    for i, v in enumerate(variants):
        y = 8 + i * row
        b = int(v.get("bytes") or 0)
        cls = "b-in" if v.get("kind") == "original" else "b-out"
        label = _variant_label(v) + ("  ● active" if v.get("active") else "")
        save = saving(ob, b) if v.get("kind") != "original" else None
        note = fmt_bytes(b) + (f"  ({'+' + fmt_pct(-save) if save < 0 else '−' + fmt_pct(save)})" if save is not None else "")
        body.append('<g class="row">' + _svg.text(label_w, y + 14, label, "t" + (" act" if v.get("active") else ""), "end")
                    + _svg.rect(bar_x, y + 3, bar_w * b / biggest, 16, cls, f"{b:,} bytes")
                    + _svg.text(bar_x + bar_w * b / biggest + 8, y + 15, note, "num") + "</g>")  # fmt: skip
    chart = _svg.svg(W, 16 + row * len(variants), body, "File size of each variant", "sizes")
    return f'<section id="sizes"><h2>Sizes</h2>{chart}</section>'


def _decision_section(variants: list[Mapping[str, Any]], policy: object) -> str:
    decided = [v for v in variants if v.get("kind") == "reduced" and isinstance(v.get("decision"), Mapping)]
    out = [f'<section id="decision"><h2>Policy decision</h2><p class="muted">Policy: <b>{esc(policy or "none")}</b></p>']
    if not decided:
        out.append('<p class="empty">No policy decision is recorded for this LoRA (no reduction under a policy yet, '
                   "or variants made by hand).</p>")  # fmt: skip
    for v in sorted(decided, key=lambda v: -int(v["id"])):
        d = v["decision"]
        ok = bool(d.get("activate"))
        badge = '<span class="badge ok">activated</span>' if ok else '<span class="badge no">not activated</span>'
        now = ' <span class="badge act">active now</span>' if v.get("active") else ""
        facts = f"saves {esc(fmt_pct(d.get('saving')))}, keeps {esc(fmt_fro(d.get('fro_retained_file')))} of the file's Frobenius norm"
        out.append(f'<div class="decision" id="decision-{int(v["id"])}">{badge}{now} <b>{esc(_variant_label(v))}</b>'
                   f' <span class="muted">· {facts}</span><div class="why">Why: {esc(d.get("reason") or "-")}</div></div>')  # fmt: skip
    return "".join(out) + "</section>"


def _variants_section(variants: list[Mapping[str, Any]], original: Mapping[str, Any] | None) -> str:
    if not variants:
        return ""
    ob = original.get("bytes") if original else None
    extra = any(v.get("rank_rule") or v.get("serve") or v.get("servers") for v in variants)
    effects = any(v.get("effect_retained") is not None for v in variants)
    head = ["", "Variant", "Kind", "Method", "Size", "Saving", "Fro retained (file)", "Module min"]
    head += ["Effect retained (mean, worst)"] if effects else []
    head += ["Rank rule", "Servers"] if extra else []
    head += ["Created"]
    nums = {"Size", "Saving", "Fro retained (file)", "Module min", "Effect retained (mean, worst)"}
    rows = []
    for v in variants:
        b = v.get("bytes")
        save = saving(ob, b) if v.get("kind") != "original" else None
        method = "-" if v.get("kind") == "original" else f"{v.get('method') or '-'} {fmt_param(v.get('param'))}".strip()
        cells = [
            '<span class="badge act">active</span>' if v.get("active") else "",
            f"#{int(v['id'])}", esc(v.get("kind") or "-"), esc(method), _bytes_html(b),
            esc(fmt_pct(save)) if save is not None else "-",
            esc(fmt_fro(v.get("fro_retained_file"))), esc(fmt_fro(v.get("fro_retained_min"))),
        ]  # fmt: skip
        if effects:
            cells.append(_effect_cell(v))
        if extra:
            rule = " ".join(str(x) for x in (v.get("rank_rule"), v.get("serve") and f"serve {v.get('serve')}") if x)
            cells += [esc(rule or "-"), esc(", ".join(str(s) for s in v.get("servers") or []) or "-")]
        cells.append(esc(v.get("created_at") or "-"))
        tds = "".join(f'<td class="num">{c}</td>' if h in nums else f"<td>{c}</td>" for h, c in zip(head, cells))
        rows.append(f'<tr class="{"active" if v.get("active") else ""}" data-variant="{int(v["id"])}">{tds}</tr>')
    ths = "".join(f'<th class="num">{esc(h)}</th>' if h in nums else f"<th>{esc(h)}</th>" for h in head)
    return (f'<section id="variants"><h2>Variants</h2><div class="wrap"><table><thead><tr>{ths}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>{_effect_notes(variants)}</section>')  # fmt: skip


def _effect_cell(v: Mapping[str, Any]) -> str:
    if v.get("effect_retained") is None:
        return "-"
    return (f'<span class="effect" data-variant="{int(v["id"])}">{esc(fmt_fro(v.get("effect_retained")))}'
            f' <span class="muted">worst {esc(fmt_fro(v.get("effect_retained_min")))}</span></span>')


def _effect_notes(variants: list[Mapping[str, Any]]) -> str:
    """Where each effect figure was measured: the base model, its hash, the sample set, when."""
    notes = []
    for v in variants:
        e = v.get("effect")
        if v.get("effect_retained") is None or not isinstance(e, Mapping):
            continue
        kl = f", mean KL {float(e['kl_mean']):.4g}" if e.get("kl_mean") is not None else ""
        notes.append(f'<li id="effect-{int(v["id"])}">{esc(_variant_label(v))}: effect retained '
                     f'{esc(fmt_fro(v.get("effect_retained")))} (worst sample {esc(fmt_fro(v.get("effect_retained_min")))}'
                     f'{esc(kl)}), {esc(e.get("kind") or "-")} output on base <span class="mono">{esc(e.get("base") or "-")}</span>'
                     f' (sha256 <span class="mono">{esc(str(e.get("base_sha256") or "")[:12])}</span>), sample set '
                     f'<span class="mono">{esc(e.get("samples_id") or "-")}</span>, measured {esc(e.get("measured_at") or "-")}</li>')  # fmt: skip
    if not notes:
        return ""
    return ('<p class="muted">Effect retained: 1 − ‖effect of the variant − effect of the original‖ / ‖effect of the '
            'original‖ on the base model\'s output, the mean over the samples and the worst sample.</p>'
            f'<ul class="effects">{"".join(notes)}</ul>')  # fmt: skip


def _hash_list(v: Mapping[str, Any]) -> str:
    items = [("SHA-256", v.get("sha256")), ("AutoV2", v.get("autov2")), ("AutoV3", v.get("autov3")),
             ("BLAKE3", v.get("blake3"))]  # fmt: skip
    return '<dl class="hashes">' + "".join(f"<dt>{k}</dt><dd>{esc(x)}</dd>" for k, x in items if x) + "</dl>"


def _hashes_section(original: Mapping[str, Any] | None, active: Mapping[str, Any] | None) -> str:
    out = ['<section id="hashes"><h2>Hashes</h2>']
    if original is not None:
        out.append(f'<div id="hashes-original"><p><b>Original</b> {esc(_variant_label(original))} '
                   f'<span class="muted">(kept byte for byte in the store)</span></p>{_hash_list(original)}</div>')  # fmt: skip
    if active is not None and active is not original:
        out.append(f'<div id="hashes-active"><p><b>Active</b> {esc(_variant_label(active))} '
                   f'<span class="muted">(the file at the path now)</span></p>{_hash_list(active)}</div>')  # fmt: skip
    elif active is not None:
        out.append('<p class="muted" id="hashes-active">The active variant is the original: the file at the path '
                   "holds these bytes.</p>")  # fmt: skip
    return "".join(out) + "</section>"


# -- modules by block ---------------------------------------------------------------------------

_MOD = {"W": 980, "label": 318, "rank_x": 330, "rank_w": 280, "rank_t": 618, "fro_x": 700, "fro_w": 200,
        "fro_t": 908, "row": 19, "head": 32}  # fmt: skip


def _fro_ticks(x: float, w: float, top: float, bottom: float) -> list[str]:
    """Grid lines and labels for a retained-Frobenius scale of 0..1 at x..x+w."""
    out = []
    for tick, anchor in ((0.0, "start"), (0.5, "middle"), (0.9, "end"), (1.0, "start")):
        xt = x + w * tick
        if tick:
            out.append(_svg.line(xt, top, xt, bottom, "grid"))
        out.append(_svg.text(xt + (-2 if anchor == "end" else 2 if tick == 1.0 else 0), 26, f"{tick:g}", "tm", anchor))
    return out


def _module_chart(block: str, mods: list[Mapping[str, Any]], rmax: int) -> str:
    g = _MOD
    body = [
        _svg.text(g["rank_x"], 12, "rank in → out", "tm"),
        _svg.text(g["rank_x"], 26, "0", "tm"),
        _svg.text(g["rank_x"] + g["rank_w"], 26, str(rmax), "tm", "end"),
        _svg.text(g["fro_x"], 12, "retained Frobenius", "tm"),
        *_fro_ticks(g["fro_x"], g["fro_w"], g["head"] - 2, g["head"] + g["row"] * len(mods)),
    ]
    prefix = block if not block.endswith("(other)") else ""
    for i, m in enumerate(mods):
        y = g["head"] + i * g["row"]
        name = str(m["name"])
        short = name[len(prefix):].lstrip("._") if prefix and name.startswith(prefix) else name
        short = short or name
        rin, rout = int(m.get("rank_in") or 0), int(m.get("rank_out") or 0)
        row = [_svg.text(g["label"], y + 13, _svg.tail(short, 46), "lbl", "end", name)]
        if m.get("skipped"):
            row.append(_svg.rect(g["rank_x"], y + 4, g["rank_w"] * rin / rmax if rin else 6, 11, "b-skip",
                                 f"passed through: {m['skipped']}"))  # fmt: skip
            row.append(_svg.text(g["rank_t"], y + 13, f"{rin} → {rin}", "num"))
            row.append(_svg.text(g["fro_x"], y + 13, f"passed through: {_svg.tail(str(m['skipped']), 40)}", "tm",
                                 title=str(m["skipped"])))  # fmt: skip
        else:
            fro = _svg.finite(m.get("fro_retained"), 0.0)
            fro_c = min(max(fro, 0.0), 1.0)
            row += [
                _svg.rect(g["rank_x"], y + 4, g["rank_w"] * rin / rmax, 11, "b-in", f"rank in {rin}"),
                _svg.rect(g["rank_x"], y + 4, g["rank_w"] * rout / rmax, 11, "b-out", f"rank out {rout}"),
                _svg.text(g["rank_t"], y + 13, f"{rin} → {rout}", "num"),
                _svg.rect(g["fro_x"], y + 4, g["fro_w"], 11, "b-lost", f"lost {fmt_fro(1 - fro)}", rx=2),
                _svg.rect(g["fro_x"], y + 4, g["fro_w"] * fro_c, 11, "b-keep",
                          f"retained {fmt_fro(m.get('fro_retained'))}, rel. error {fmt_fro(m.get('rel_error'))}"),
                _svg.text(g["fro_t"], y + 13, fmt_fro(m.get("fro_retained")), "num"),
            ]  # fmt: skip
        body.append(f'<g class="row mod" data-name="{esc(name)}">{"".join(row)}</g>')
    height = g["head"] + g["row"] * len(mods) + 4
    return _svg.svg(g["W"], height, body, f"Rank and retained Frobenius of the modules of {block}", "modules")


def _block_overview(groups: list[tuple[str, list[Mapping[str, Any]]]]) -> str:
    W, label, bar_x, bar_w, t_x, fro_x, fro_w, fro_t, row, head = 980, 318, 330, 250, 588, 730, 170, 908, 22, 32
    pmax = max((sum(int(m.get("params_in") or 0) for m in ms) for _, ms in groups), default=0) or 1
    body = [_svg.text(bar_x, 12, "parameters before → after", "tm"),
            _svg.text(fro_x, 12, "weakest module's retained Frobenius", "tm"),
            *_fro_ticks(fro_x, fro_w, head - 2, head + row * len(groups))]  # fmt: skip
    for i, (block, ms) in enumerate(groups):
        y = head + i * row
        pin = sum(int(m.get("params_in") or 0) for m in ms)
        pout = sum(int(m.get("params_out") or 0) for m in ms)
        frs = [_svg.finite(m.get("fro_retained"), 0.0) for m in ms if not m.get("skipped")]
        lo = min(frs) if frs else None
        save = saving(pin, pout)
        parts = [
            _svg.text(label, y + 15, _svg.tail(block, 46), "lbl", "end", f"{block}: {len(ms)} modules"),
            _svg.rect(bar_x, y + 5, bar_w * pin / pmax, 12, "b-in", f"{pin:,} parameters before"),
            _svg.rect(bar_x, y + 5, bar_w * pout / pmax, 12, "b-out", f"{pout:,} parameters after"),
            _svg.text(t_x, y + 15, f"{fmt_count(pin)} → {fmt_count(pout)}" + (f" (−{fmt_pct(save)})" if save else ""), "num"),
        ]  # fmt: skip
        if lo is not None:
            parts += [_svg.rect(fro_x, y + 5, fro_w, 12, "b-lost"),
                      _svg.rect(fro_x, y + 5, fro_w * min(max(lo, 0.0), 1.0), 12, "b-keep"),
                      _svg.text(fro_t, y + 15, fmt_fro(lo), "num")]  # fmt: skip
        body.append(f'<g class="row blk" data-block="{esc(block)}">{"".join(parts)}</g>')
    return _svg.svg(W, head + row * len(groups) + 4, body, "Parameters and weakest retained Frobenius per block", "blocks")


def _modules_section(modules: list[Mapping[str, Any]], shown: Mapping[str, Any] | None,
                     active: Mapping[str, Any] | None, spectra: str) -> str:  # fmt: skip
    """The block overview, then `spectra` (a section of its own), then each block's modules."""
    title = "Modules"
    if shown is not None:
        state = "active" if shown is active else "not active"
        title = f"Modules of {_variant_label(shown)} ({state})"
    out = [f'<section id="modules"><h2>{esc(title)}</h2>']
    if not modules:
        out.append('<p class="empty">No reduced variant yet: nothing to show per module.</p></section>')
        return "".join(out) + spectra
    groups = group_by_block(modules)
    rmax = max((int(m.get("rank_in") or 0) for m in modules), default=0) or 1
    reduced = [m for m in modules if not m.get("skipped")]
    out.append(f'<p class="muted">{len(modules)} modules in {len(groups)} blocks'
               f'{f", {len(modules) - len(reduced)} passed through unchanged" if len(reduced) < len(modules) else ""}. '
               "Bars share one scale across blocks; hover a bar for its exact value.</p>")  # fmt: skip
    out.append('<div class="legend"><span class="l-in">rank / parameters before</span><span class="l-out">after</span>'
               '<span class="l-keep">retained Frobenius ‖ΔW′‖/‖ΔW‖</span><span class="l-lost">lost</span></div>')  # fmt: skip
    out.append('<h3 class="overview">Blocks at a glance</h3>' + _block_overview(groups) + "</section>")
    out.append(spectra)
    out.append('<section id="blocks"><h2>Rank and retained Frobenius, block by block</h2>')
    fold = len(modules) > OPEN_MODULE_LIMIT
    for block, ms in groups:
        rin = sum(int(m.get("rank_in") or 0) for m in ms)
        rout = sum(int(m.get("rank_out") or m.get("rank_in") or 0) for m in ms)
        frs = [_svg.finite(m.get("fro_retained"), 0.0) for m in ms if not m.get("skipped")]
        sub = f"{len(ms)} module{'s' if len(ms) != 1 else ''} · total rank {rin} → {rout}"
        if frs:
            sub += f" · retained Frobenius {fmt_fro(min(frs))}–{fmt_fro(max(frs))}"
        out.append(f'<details class="block"{"" if fold else " open"} data-block="{esc(block)}"><summary>'
                   f'<h3>{esc(block)}<span class="sub">{esc(sub)}</span></h3></summary>'
                   f"{_module_chart(block, ms, rmax)}</details>")  # fmt: skip
    out.append(_module_table(modules))
    return "".join(out) + "</section>"


def _module_table(modules: list[Mapping[str, Any]]) -> str:
    head = ["Module", "Kind", "Rank in", "Rank out", "Params in", "Params out", "Fro retained", "Rel. error", "Note"]
    nums = {"Rank in", "Rank out", "Params in", "Params out", "Fro retained", "Rel. error"}
    rows = []
    for m in sorted(modules, key=lambda m: _natural(str(m["name"]))):
        cells = [f'<span class="mono">{esc(m["name"])}</span>', esc(m.get("kind") or "-"), str(int(m.get("rank_in") or 0)),
                 str(int(m.get("rank_out") or 0)), f"{int(m.get('params_in') or 0):,}", f"{int(m.get('params_out') or 0):,}",
                 esc(fmt_fro(m.get("fro_retained"))), esc(fmt_fro(m.get("rel_error"))),
                 esc(f"passed through: {m['skipped']}" if m.get("skipped") else "")]  # fmt: skip
        rows.append("<tr>" + "".join(f'<td class="num">{c}</td>' if h in nums else f"<td>{c}</td>"
                                     for h, c in zip(head, cells)) + "</tr>")  # fmt: skip
    ths = "".join(f'<th class="num">{h}</th>' if h in nums else f"<th>{h}</th>" for h in head)
    return (f'<details class="table" id="module-table"><summary>Every module as a table ({len(modules)})</summary>'
            f'<div class="wrap"><table><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table></div></details>')  # fmt: skip


# -- spectra -------------------------------------------------------------------------------------


LOG_RANGE = 30.0  # spectra spanning more than this (largest / smallest non-zero) are drawn on a log scale
LOG_FLOOR = -6  # lowest decade drawn (relative to the largest value)


def _spectrum_chart(s: Mapping[str, Any]) -> tuple[str, float | None]:
    values = [max(_svg.finite(x), 0.0) for x in s.get("values") or []]
    count = len(values)
    cut = min(max(int(s.get("cut") or 0), 0), count)
    W, H, x0, x1, y0, y1 = 440, 204, 44, 404, 16, 170
    pw, ph = x1 - x0, y1 - y0
    top = max(values, default=0.0) or 1.0
    positive = [v for v in values if v > 0]
    low = min(positive, default=top)
    log = top / low > LOG_RANGE
    decades = max(LOG_FLOOR, math.floor(math.log10(low / top))) if log else 0

    def height(v: float) -> float:
        if not log:
            return ph * v / top
        if v <= 0:
            return 0.0
        return ph * max(0.0, math.log10(v / top) - decades) / -decades

    body = [_svg.line(x0, y1, x1, y1, "axis"), _svg.line(x0, y0, x0, y1, "axis"), _svg.line(x1, y0, x1, y1, "axis")]
    if log:
        every = 1 if -decades <= 6 else 2
        for e in range(0, decades - 1, -every):
            y = y1 - height(top * 10.0**e)
            body += [_svg.line(x0, y, x1, y, "grid") if e > decades else "",
                     _svg.text(x0 - 5, y + 4, "1" if e == 0 else f"1e{e}", "tm", "end")]  # fmt: skip
    else:
        for tick in (0.0, 0.5, 1.0):
            y = y1 - ph * tick
            body += [_svg.line(x0, y, x1, y, "grid") if tick else "", _svg.text(x0 - 5, y + 4, f"{tick:g}", "tm", "end")]
    for tick in (0.0, 0.5, 1.0):  # the retained-Frobenius line's own axis, on the right
        body.append(_svg.text(x1 + 5, y1 - ph * tick + 4, f"{tick:g}", "t-keep"))
    body.append(_svg.text(x0 - 5, y0 - 6, "σ/σ₁" + (" (log)" if log else ""), "tm", "start"))
    body.append(_svg.text(x1 + 26, y0 - 6, "retained", "t-keep", "end"))
    step = pw / max(count, 1)
    gap = min(1.0, step * 0.2) if count > 1 else 0
    for i, v in enumerate(values):
        h = height(v)
        cls = "b-out" if i < cut else "b-in"
        body.append(_svg.rect(x0 + i * step + gap / 2, y1 - h, max(step - gap, 0.6), h, cls, f"σ{i + 1} = {v:.4g}", rx=0))
    energy = [v * v for v in values]
    total = sum(energy)
    retained = None
    if total > 0:
        acc, pts = 0.0, [(x0, y1)]
        for i, e in enumerate(energy):
            acc += e
            pts.append((x0 + (i + 1) * step, y1 - ph * math.sqrt(acc / total)))
        body.append(_svg.polyline(pts, "cum"))
        retained = math.sqrt(sum(energy[:cut]) / total)
    xc = x0 + cut * step
    body.append(_svg.line(xc, y0 - 4, xc, y1, "cut"))
    anchor = "start" if cut < count * 0.6 else "end"
    dx = 5 if anchor == "start" else -5
    body.append(_svg.text(xc + dx, y1 - ph * 0.45, f"cut: {cut} of {count} kept", "t-cut", anchor))
    body.append(_svg.text(x0, H - 14, "1", "tm", "middle"))
    body.append(_svg.text(x1, H - 14, str(count), "tm", "middle"))
    body.append(_svg.text((x0 + x1) / 2, H - 14, "singular value index", "tm", "middle"))
    label = f"Spectrum of {s.get('name')}: {cut} of {count} directions kept" + (" (log scale)" if log else "")
    return _svg.svg(W, H, body, label, "spectrum" + (" log" if log else "")), retained


def _spectra_section(spectra: list[Mapping[str, Any]]) -> str:
    out = ['<section id="spectra"><h2>Spectra of the largest modules</h2>']
    if not spectra:
        out.append('<p class="empty">No spectra recorded.</p></section>')
        return "".join(out)
    out.append('<p class="muted">Singular values σ of each module\'s update ΔW relative to the largest (left axis; a log '
               "scale where they span more than a factor of 30). The line is the retained Frobenius ratio when keeping "
               "the first k directions (right axis).</p>")  # fmt: skip
    out.append('<div class="legend"><span class="l-out">kept</span><span class="l-in">cut</span>'
               '<span class="l-cum">retained Frobenius up to k</span><span class="l-cut">the cut</span></div><div class="spectra">')  # fmt: skip
    for s in spectra:
        chart, retained = _spectrum_chart(s)
        count, cut = len(s.get("values") or []), min(max(int(s.get("cut") or 0), 0), len(s.get("values") or []))
        keeps = f"keeps {cut} of {count} directions, retains {fmt_fro(retained)}"
        out.append(f'<div class="spec-card" data-name="{esc(s.get("name"))}"><div class="name" title="{esc(s.get("name"))}">'
                   f'{esc(s.get("name"))}</div><div class="muted">{esc(keeps)}</div>{chart}</div>')  # fmt: skip
    return "".join(out) + "</div></section>"


# ---------------------------------------------------------------------------------------------
# The library


def _active_label(x: Mapping[str, Any]) -> str:
    if x.get("active_kind") != "reduced":
        return "original"
    return f"{x.get('method') or 'reduced'} {fmt_param(x.get('param'))}".strip()


def render_library(doc: Mapping[str, Any]) -> str:
    """The library: space saved per folder and a sortable table of every LoRA, as one HTML page."""
    folders = list(doc.get("folders") or [])
    loras = list(doc.get("loras") or [])
    orig = sum(int(x.get("bytes_original") or 0) for x in loras)
    now = sum(int(x.get("bytes_active") or 0) for x in loras if x.get("bytes_original") is not None)
    reduced = sum(1 for x in loras if x.get("active_kind") == "reduced")
    refused = sum(1 for x in loras if x.get("refused"))
    header = ('<header class="top"><div class="brand">lorad report</div><h1>LoRA library</h1>'
              f'<p class="meta">{len(folders)} watched folder{"s" if len(folders) != 1 else ""} · '
              f'generated {esc(doc.get("generated_at") or "-")}</p></header>')  # fmt: skip
    save = saving(orig, now)
    cards = [
        _card("LoRAs", str(len(loras)), f"{reduced} reduced" + (f", {refused} refused" if refused else ""), "card-loras"),
        _card("Originals", _bytes_html(orig), "", "card-original"),
        _card("Now on disk", _bytes_html(now), "", "card-active"),
        _card("Saved", _bytes_html(orig - now), esc(fmt_pct(save)) + " of the originals" if save is not None else "", "card-saved"),
    ]  # fmt: skip
    body = (header + "<main>" + '<section class="cards" id="summary">' + "".join(cards) + "</section>"
            + _folders_section(folders) + _library_table(loras) + "</main>" + _footer(doc.get("generated_at")))  # fmt: skip
    return _page("lorad report: LoRA library", body, _SORT_JS)


def _folders_section(folders: list[Mapping[str, Any]]) -> str:
    out = ['<section id="folders"><h2>Space saved per folder</h2>']
    if not folders:
        return out[0] + '<p class="empty">No watched folder.</p></section>'
    out.append('<div class="legend"><span class="l-in">originals</span><span class="l-out">now on disk</span></div>')
    W, label, bar_x, bar_w, row, head = 980, 330, 342, 330, 30, 6
    bmax = max(int(f.get("bytes_original") or 0) for f in folders) or 1
    body = []
    for i, f in enumerate(folders):
        y = head + i * row
        bo, ba = int(f.get("bytes_original") or 0), int(f.get("bytes_active") or 0)
        save = saving(bo, ba)
        count = int(f.get("loras") or 0)
        note = (f"saved {fmt_bytes(bo - ba)}" + (f" ({fmt_pct(save)})" if save is not None else "")
                + f" · {count} LoRA{'s' if count != 1 else ''}")  # fmt: skip
        body.append(f'<g class="row folder" data-path="{esc(f.get("path"))}">'
                    + _svg.text(label, y + 16, _svg.tail(str(f.get("path")), 48), "lbl", "end", str(f.get("path")))
                    + _svg.rect(bar_x, y + 4, bar_w * bo / bmax, 18, "b-in", f"originals {fmt_bytes(bo)} ({bo:,} bytes)")
                    + _svg.rect(bar_x, y + 4, bar_w * ba / bmax, 18, "b-out", f"now {fmt_bytes(ba)} ({ba:,} bytes)")
                    + _svg.text(bar_x + bar_w + 12, y + 17, note, "num") + "</g>")  # fmt: skip
    out.append(_svg.svg(W, head * 2 + row * len(folders), body, "Space saved per watched folder", "folders"))
    return "".join(out) + "</section>"


def _library_table(loras: list[Mapping[str, Any]]) -> str:
    # (header, numeric?, css class)
    cols = [("ID", True, ""), ("LoRA", False, "name"), ("Folder", False, "folder"), ("Active", False, "nowrap"),
            ("Original", True, ""), ("Now", True, ""), ("Saved", True, ""), ("Saved %", True, ""),
            ("Fro retained (file)", True, ""), ("Note", False, "note")]  # fmt: skip
    effects = any(x.get("effect_retained") is not None for x in loras)
    if effects:
        cols.insert(-1, ("Effect retained", True, ""))
    rows = []
    for x in sorted(loras, key=lambda x: _natural(str(x.get("path") or ""))):
        bo, ba = x.get("bytes_original"), x.get("bytes_active")
        saved = int(bo) - int(ba) if bo is not None and ba is not None else None
        pct = saving(bo, ba)
        fro = x.get("fro_retained_file")
        path = str(x.get("path") or "")
        ident = x.get("id")
        cells = [
            (str(int(ident)) if ident is not None else "-", "" if ident is None else str(int(ident))),
            (f'<span title="{esc(path)}">{esc(_within(path, str(x.get("folder") or "")))}</span>', None),
            (f'<span class="mono">{esc(x.get("folder") or "-")}</span>', None),
            (esc(_active_label(x)), None),
            (_bytes_html(bo), "" if bo is None else str(int(bo))),
            (_bytes_html(ba), "" if ba is None else str(int(ba))),
            (_bytes_html(saved), "" if saved is None else str(saved)),
            (esc(fmt_pct(pct)), "" if pct is None else repr(float(pct))),
            (esc(fmt_fro(fro)), "" if fro is None else repr(float(_svg.finite(fro)))),
            (esc(f"refused: {x['refused']}") if x.get("refused") else "", None),
        ]  # fmt: skip
        if effects:
            eff = x.get("effect_retained")
            shown = "-" if eff is None else f"{fmt_fro(eff)} (worst {fmt_fro(x.get('effect_retained_min'))})"
            cells.insert(-1, (esc(shown), "" if eff is None else repr(float(_svg.finite(eff)))))
        tds = []
        for (head, numeric, cls), (content, key) in zip(cols, cells):
            attr = f' data-v="{esc(key)}"' if key is not None else ""
            tds.append(f'<td class="{"num" if numeric else cls}"{attr}>{content}</td>')
        cls = "refused" if x.get("refused") else ""
        rows.append(f'<tr class="{cls}" data-path="{esc(path)}">{"".join(tds)}</tr>')
    ths = "".join(f'<th class="{"num" if numeric else ""}" data-type="{"num" if numeric else "text"}">'
                  f'<button type="button">{esc(head)}</button></th>' for head, numeric, _ in cols)  # fmt: skip
    return ('<section id="loras"><h2>Every LoRA</h2>'
            '<p class="muted">Click a column header to sort; click again to reverse.</p>'
            '<input class="filter" type="search" data-for="lora-table" placeholder="Filter by name, folder, method…" '
            'aria-label="Filter the table">'
            f'<div class="wrap"><table class="sortable" id="lora-table"><thead><tr>{ths}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Writing


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
