"""The library page (`render_library`): the space saved, per folder as an SVG chart, and every LoRA
in one table that the page's own script sorts and filters.

The input contract is in lorad.report.html's docstring; the page shell and the sorting script
come from lorad.report._page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorad.report import _svg
from lorad.report._page import SORT_JS, bytes_html, card, footer, natural, page, within
from lorad.report._svg import esc, fmt_bytes, fmt_fro, fmt_param, fmt_pct, saving


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
        card("LoRAs", str(len(loras)), f"{reduced} reduced" + (f", {refused} refused" if refused else ""), "card-loras"),
        card("Originals", bytes_html(orig), "", "card-original"),
        card("Now on disk", bytes_html(now), "", "card-active"),
        card("Saved", bytes_html(orig - now), esc(fmt_pct(save)) + " of the originals" if save is not None else "", "card-saved"),
    ]  # fmt: skip
    body = (header + "<main>" + '<section class="cards" id="summary">' + "".join(cards) + "</section>"
            + _folders_section(folders) + _library_table(loras) + "</main>" + footer(doc.get("generated_at")))  # fmt: skip
    return page("lorad report: LoRA library", body, SORT_JS)


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
    for x in sorted(loras, key=lambda x: natural(str(x.get("path") or ""))):
        bo, ba = x.get("bytes_original"), x.get("bytes_active")
        saved = int(bo) - int(ba) if bo is not None and ba is not None else None
        pct = saving(bo, ba)
        fro = x.get("fro_retained_file")
        path = str(x.get("path") or "")
        ident = x.get("id")
        cells = [
            (str(int(ident)) if ident is not None else "-", "" if ident is None else str(int(ident))),
            (f'<span title="{esc(path)}">{esc(within(path, str(x.get("folder") or "")))}</span>', None),
            (f'<span class="mono">{esc(x.get("folder") or "-")}</span>', None),
            (esc(_active_label(x)), None),
            (bytes_html(bo), "" if bo is None else str(int(bo))),
            (bytes_html(ba), "" if ba is None else str(int(ba))),
            (bytes_html(saved), "" if saved is None else str(saved)),
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

