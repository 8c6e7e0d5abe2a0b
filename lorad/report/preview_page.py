"""Where lorad.report.preview's section goes: the standalone page of `lorad preview ORIGINAL OTHER`
(`render_preview`), and the Preview section inside a LoRA's page, its pictures labelled with the
variants they were rendered from (`lora_preview_section`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorad.report._page import footer, name_of, page, variant_label
from lorad.report._svg import esc
from lorad.report.preview import preview_section


def lora_preview_section(preview: object, variants: list[Mapping[str, Any]]) -> str:
    if not isinstance(preview, Mapping):
        return ""
    by_id = {int(v["id"]): v for v in variants}

    def label(key: str, default: str) -> str:
        v = by_id.get(int(preview[key])) if preview.get(key) is not None else None
        return variant_label(v) if v else default

    return preview_section(preview, label("reference_id", "original"), label("variant_id", "variant"))


def render_preview(doc: Mapping[str, Any]) -> str:
    """`lorad preview ORIGINAL OTHER`: a page with the Preview section of two files (no daemon)."""
    original, other = str(doc.get("original") or ""), str(doc.get("other") or "")
    header = (
        '<header class="top"><div class="brand">lorad preview</div>'
        f'<h1 id="lora-name">{esc(name_of(other))}</h1>'
        f'<p class="path">original <span class="mono" id="preview-original">{esc(original)}</span><br>'
        f'other <span class="mono" id="preview-other">{esc(other)}</span></p>'
        f'<p class="meta">generated {esc(doc.get("generated_at") or "-")}</p></header>'
    )
    section = preview_section(doc["preview"], f"original ({name_of(original)})", f"other ({name_of(other)})")
    body = header + "<main>" + section + "</main>" + footer(doc.get("generated_at"))
    return page(f"lorad preview: {name_of(other)}", body)

