"""The Preview section of a report: the same prompts and seeds rendered with the original and with a
variant, side by side with their difference image and SSIM (lorad.engine.effect.preview makes them).

Pure: plain data in (PNG bytes and figures), HTML text out. The pictures go inline as data: PNG
URLs, so the page stays one self-contained file (the page's Content-Security-Policy allows images
from data: only). Bytes that are not a PNG are refused, never embedded.

Input contract, `preview_section(p, original_label, other_label)` (extra keys are ignored):
p = {"ssim_mean", "ssim_min": float, "prompts": [str], "seeds": [int], "steps": int, "height", "width": int,
     "guidance_scale": float | None, "pipeline": str, "base": str, "base_sha256": str, "device": str,
     "seconds": float, "diff_gain": float, "shown_max": int,
     "pairs": [{"prompt", "seed", "ssim", "mean_abs_diff", "max_abs_diff", "blanked",
                "original_png", "other_png", "diff_png": bytes}]}
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from lorad.report._svg import esc

_PNG = b"\x89PNG\r\n\x1a\n"

PREVIEW_CSS = """
.pv-prompt{margin:18px 0 6px;font-size:15px;font-weight:600}
.pv-pair{margin:8px 0 16px}
.pv-row{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:10px;max-width:1100px}
.pv-row figure{margin:0}
.pv-row img{display:block;width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#000}
.pv-row img.px{image-rendering:pixelated}
.pv-row figcaption{font-size:12px;color:var(--muted);margin-top:3px}
.pv-figs{font-size:13px;margin-top:4px;font-variant-numeric:tabular-nums}
.pv-figs .ssim{font-weight:650}
dl.pv-set{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:6px 0 10px;font-size:13.5px}
dl.pv-set dt{color:var(--muted)} dl.pv-set dd{margin:0;overflow-wrap:anywhere}
"""


def _img(png: object, alt: str, small: bool) -> str:
    if not isinstance(png, (bytes, bytearray)) or not bytes(png).startswith(_PNG):
        raise ValueError(f"preview picture {alt!r} is not PNG data")
    data = base64.b64encode(bytes(png)).decode("ascii")
    cls = ' class="px"' if small else ""
    return f'<img{cls} alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _num(x: object, digits: int = 4) -> str:
    return f"{float(x):.{digits}f}"  # type: ignore[arg-type]


def preview_section(p: Mapping[str, Any], original_label: str = "original", other_label: str = "variant") -> str:
    """`<section id="preview">`: per prompt and seed, original | other | difference, SSIM under each
    pair; what was rendered (base and its hash, pipeline, prompts, seeds, steps, size) above."""
    pairs = list(p.get("pairs") or [])
    small = int(p.get("width") or 0) < 256
    gain = float(p.get("diff_gain") or 1)
    gain_text = f"{gain:g}"
    guidance = "the pipeline's default" if p.get("guidance_scale") is None else f"{float(p['guidance_scale']):g}"
    settings = [
        ("Base model", f'<span class="mono">{esc(p.get("base") or "-")}</span> (sha256 '
                       f'<span class="mono" id="preview-base-sha">{esc(str(p.get("base_sha256") or "")[:16])}</span>)'),
        ("Pipeline", f'{esc(p.get("pipeline") or "-")} on {esc(p.get("device") or "-")}, '
                     f'{int(p.get("width") or 0)}×{int(p.get("height") or 0)} pixels'),
        ("Prompts", "<br>".join(f"{i + 1}. {esc(t)}" for i, t in enumerate(p.get("prompts") or []))),
        ("Seeds", esc(", ".join(str(int(s)) for s in p.get("seeds") or []))),
        ("Steps", f'<span id="preview-steps">{int(p.get("steps") or 0)}</span>, guidance scale {esc(guidance)}'),
        ("SSIM", f'<b id="preview-ssim-mean">{_num(p.get("ssim_mean", 0))}</b> mean, '
                 f'<span id="preview-ssim-min">{_num(p.get("ssim_min", 0))}</span> worst over {len(pairs)} pairs'),
    ]  # fmt: skip
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in settings)
    blocks: list[str] = []
    last_prompt: object = None
    for i, pair in enumerate(pairs):
        prompt, seed = pair.get("prompt"), int(pair.get("seed") or 0)
        if prompt != last_prompt:
            blocks.append(f'<h3 class="pv-prompt">{esc(prompt)}</h3>')
            last_prompt = prompt
        where = f"seed {seed}"
        note = (' · <span class="badge bad">the pipeline\'s safety checker blanked a picture</span>'
                if pair.get("blanked") else "")  # fmt: skip
        blocks.append(
            f'<div class="pv-pair" data-pair="{i}" data-seed="{seed}"><div class="pv-row">'
            f'<figure>{_img(pair.get("original_png"), f"{original_label}, {where}", small)}'
            f"<figcaption>{esc(original_label)}</figcaption></figure>"
            f'<figure>{_img(pair.get("other_png"), f"{other_label}, {where}", small)}'
            f"<figcaption>{esc(other_label)}</figcaption></figure>"
            f'<figure>{_img(pair.get("diff_png"), f"difference, {where}", small)}'
            f"<figcaption>difference ×{esc(gain_text)}</figcaption></figure></div>"
            f'<div class="pv-figs">{esc(where)} · SSIM <span class="ssim" data-ssim="{float(pair.get("ssim", 0))!r}">'
            f'{_num(pair.get("ssim", 0))}</span> · mean |Δ| {_num(pair.get("mean_abs_diff", 0), 2)}, '
            f'max {int(pair.get("max_abs_diff") or 0)} of 255{note}</div></div>'
        )  # fmt: skip
    return (
        '<section id="preview"><h2>Preview</h2>'
        f'<p class="muted">The same prompts and seeds rendered with {esc(original_label)} and with {esc(other_label)}, '
        "each loaded by diffusers' own <span class=\"mono\">load_lora_weights</span>. SSIM (structural similarity, "
        "Wang et al. 2004, Gaussian window σ 1.5, over the RGB channels) is 1 for the same picture. The difference "
        f"image is |{esc(original_label)} − {esc(other_label)}| per pixel and channel, times {esc(gain_text)}, clipped: "
        "black where they agree. SSIM and the differences are computed at full size; pictures larger than "
        f"{int(p.get('shown_max') or 0)} pixels are shown scaled down (the difference image by its block maximum).</p>"
        f'<dl class="pv-set">{dl}</dl>{"".join(blocks)}</section>'
    )  # fmt: skip
