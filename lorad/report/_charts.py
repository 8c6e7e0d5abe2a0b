"""The LoRA page's SVG charts: each block's modules (rank in → out and retained Frobenius), the
overview of all blocks, and the Spectra section (singular values, the cut, the retained line).

Markup out, from the plain module and spectrum dicts of render_lora's document; the page's CSS
styles every class used here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lorad.report import _svg
from lorad.report._svg import esc, fmt_count, fmt_fro, fmt_pct, saving

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


def module_chart(block: str, mods: list[Mapping[str, Any]], rmax: int) -> str:
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


def block_overview(groups: list[tuple[str, list[Mapping[str, Any]]]]) -> str:
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


def spectra_section(spectra: list[Mapping[str, Any]]) -> str:
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

