"""The page shell every report shares, and the small formatters its pages use.

`page` wraps a body in one self-contained HTML document: the inline CSS (the report's own and
lorad.report.preview's), the Content-Security-Policy that admits only our own script by its hash,
and at most one inline script (`SORT_JS`, the library table's sorting and filtering). Beside it:
the summary cards, sizes with the byte count on hover, the footer, file names and paths as the
pages print them, the natural sort key, and a variant's label (`#2 fro 0.9`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

from lorad.report._svg import esc, fmt_bytes, fmt_param
from lorad.report.preview import PREVIEW_CSS

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
SORT_JS = """
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


def page(title: str, body: str, script: str | None = None) -> str:
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


def card(key: str, value: str, detail: str = "", cid: str = "") -> str:
    """`value` and `detail` are markup (already escaped)."""
    ident = f' id="{esc(cid)}"' if cid else ""
    d = f'<div class="d">{detail}</div>' if detail else ""
    return f'<div class="card"{ident}><div class="k">{esc(key)}</div><div class="v">{value}</div>{d}</div>'


def bytes_html(b: int | None) -> str:
    """A size for people, with the exact byte count on hover."""
    if b is None:
        return "-"
    return f'<span title="{int(b):,} bytes">{esc(fmt_bytes(b))}</span>'


def footer(generated_at: object) -> str:
    return (f"<footer>Generated by lorad at {esc(generated_at)}. This page is self-contained: "
            "it loads nothing from anywhere.</footer>")  # fmt: skip


def within(path: str, folder: str) -> str:
    """`path` relative to `folder` (subfolders kept: `characters/anna.safetensors`), else its name."""
    base = folder.rstrip("/") + "/" if folder else ""
    return path[len(base):] if base and path.startswith(base) and len(path) > len(base) else name_of(path)


def name_of(path: str) -> str:
    base = os.path.basename(path.rstrip("/")) if path else ""
    return base or path


def natural(text: str) -> tuple[Any, ...]:
    """A sort key in natural order: `blocks_2` before `blocks_10`, case ignored."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text.lower()))


def variant_label(v: Mapping[str, Any]) -> str:
    if v.get("kind") == "original":
        return f"#{int(v['id'])} original"
    method = v.get("method") or "reduced"
    param = fmt_param(v.get("param"))
    return f"#{int(v['id'])} {method} {param}".rstrip()

