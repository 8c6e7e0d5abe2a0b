"""The page of one LoRA (`render_lora`): the summary cards, sizes, the policy's decisions, the
variants with their effect figures, the Preview section when there is one, the modules block by
block with the spectra, and the hashes.

The input contract is in lorad.report.html's docstring. The charts come from lorad.report._charts,
the page shell and shared formatters from lorad.report._page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorad.report import _svg
from lorad.report._charts import block_overview, module_chart, spectra_section
from lorad.report._page import bytes_html, card, footer, name_of, natural, page, variant_label
from lorad.report._svg import esc, fmt_bytes, fmt_fro, fmt_param, fmt_pct, saving
from lorad.report.blocks import group_by_block
from lorad.report.preview_page import lora_preview_section

# Above this many modules the per-block module charts start folded (the block overview stays open).
OPEN_MODULE_LIMIT = 400


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
    name = name_of(path)

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
        lora_preview_section(doc.get("preview"), variants),
        _modules_section(modules, shown, active, spectra_section(spectra)),
        _hashes_section(original, active),
    ]
    body = header + "<main>" + "".join(parts) + "</main>" + footer(doc.get("generated_at"))
    return page(f"lorad report: {name}", body)


def _lora_cards(original: Mapping[str, Any] | None, active: Mapping[str, Any] | None,
                shown: Mapping[str, Any] | None, modules: list[Mapping[str, Any]]) -> str:  # fmt: skip
    ob = original.get("bytes") if original else None
    ab = active.get("bytes") if active else None
    save = saving(ob, ab)
    cards = [
        card("Original", bytes_html(ob), esc(variant_label(original)) if original else "not recorded", "card-original"),
        card("Now on disk", bytes_html(ab), esc(variant_label(active)) + " (active)" if active else "no active variant", "card-active"),
        card("Saved", esc(fmt_pct(save)) if save is not None else "-",
              bytes_html(int(ob) - int(ab)) if ob is not None and ab is not None else "", "card-saved"),
    ]  # fmt: skip
    quality = active if active and active.get("kind") == "reduced" else shown
    if quality is not None:
        label = "active" if quality is active else "not active"
        cards.append(card("Retained Frobenius", esc(fmt_fro(quality.get("fro_retained_file"))),
                           f"whole file, {esc(variant_label(quality))} ({label}); module min "
                           f"{esc(fmt_fro(quality.get('fro_retained_min')))}", "card-fro"))  # fmt: skip
    measured = quality if quality is not None and quality.get("effect_retained") is not None else None
    if measured is not None:
        e = measured.get("effect") or {}
        cards.append(card("Effect retained", esc(fmt_fro(measured.get("effect_retained"))),
                           f"mean over the samples, worst {esc(fmt_fro(measured.get('effect_retained_min')))}; "
                           f"{esc(variant_label(measured))} on {esc(name_of(str(e.get('base') or '')) or '-')}",
                           "card-effect"))  # fmt: skip
    reduced = [m for m in modules if not m.get("skipped")]
    if modules:
        rin = [int(m["rank_in"]) for m in reduced] or [0]
        rout = [int(m["rank_out"]) for m in reduced] or [0]
        skipped = len(modules) - len(reduced)
        cards.append(card("Modules", f"{len(reduced)} <span class=\"muted\">reduced</span>",
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
        label = variant_label(v) + ("  ● active" if v.get("active") else "")
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
        out.append(f'<div class="decision" id="decision-{int(v["id"])}">{badge}{now} <b>{esc(variant_label(v))}</b>'
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
            f"#{int(v['id'])}", esc(v.get("kind") or "-"), esc(method), bytes_html(b),
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
        notes.append(f'<li id="effect-{int(v["id"])}">{esc(variant_label(v))}: effect retained '
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
        out.append(f'<div id="hashes-original"><p><b>Original</b> {esc(variant_label(original))} '
                   f'<span class="muted">(kept byte for byte in the store)</span></p>{_hash_list(original)}</div>')  # fmt: skip
    if active is not None and active is not original:
        out.append(f'<div id="hashes-active"><p><b>Active</b> {esc(variant_label(active))} '
                   f'<span class="muted">(the file at the path now)</span></p>{_hash_list(active)}</div>')  # fmt: skip
    elif active is not None:
        out.append('<p class="muted" id="hashes-active">The active variant is the original: the file at the path '
                   "holds these bytes.</p>")  # fmt: skip
    return "".join(out) + "</section>"



# -- modules by block ---------------------------------------------------------------------------


def _modules_section(modules: list[Mapping[str, Any]], shown: Mapping[str, Any] | None,
                     active: Mapping[str, Any] | None, spectra: str) -> str:  # fmt: skip
    """The block overview, then `spectra` (a section of its own), then each block's modules."""
    title = "Modules"
    if shown is not None:
        state = "active" if shown is active else "not active"
        title = f"Modules of {variant_label(shown)} ({state})"
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
    out.append('<h3 class="overview">Blocks at a glance</h3>' + block_overview(groups) + "</section>")
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
                   f"{module_chart(block, ms, rmax)}</details>")  # fmt: skip
    out.append(_module_table(modules))
    return "".join(out) + "</section>"


def _module_table(modules: list[Mapping[str, Any]]) -> str:
    head = ["Module", "Kind", "Rank in", "Rank out", "Params in", "Params out", "Fro retained", "Rel. error", "Note"]
    nums = {"Rank in", "Rank out", "Params in", "Params out", "Fro retained", "Rel. error"}
    rows = []
    for m in sorted(modules, key=lambda m: natural(str(m["name"]))):
        cells = [f'<span class="mono">{esc(m["name"])}</span>', esc(m.get("kind") or "-"), str(int(m.get("rank_in") or 0)),
                 str(int(m.get("rank_out") or 0)), f"{int(m.get('params_in') or 0):,}", f"{int(m.get('params_out') or 0):,}",
                 esc(fmt_fro(m.get("fro_retained"))), esc(fmt_fro(m.get("rel_error"))),
                 esc(f"passed through: {m['skipped']}" if m.get("skipped") else "")]  # fmt: skip
        rows.append("<tr>" + "".join(f'<td class="num">{c}</td>' if h in nums else f"<td>{c}</td>"
                                     for h, c in zip(head, cells)) + "</tr>")  # fmt: skip
    ths = "".join(f'<th class="num">{h}</th>' if h in nums else f"<th>{h}</th>" for h in head)
    return (f'<details class="table" id="module-table"><summary>Every module as a table ({len(modules)})</summary>'
            f'<div class="wrap"><table><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table></div></details>')  # fmt: skip

