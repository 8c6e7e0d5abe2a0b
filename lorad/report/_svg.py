"""Small pieces for the HTML report pages: escaping, number formats, inline SVG.

Everything returns text. Every string that comes from data goes through `esc`; numbers are
formatted from int()/float() so nothing else can reach the markup. The SVG carries no xmlns (inline
SVG in HTML needs none) and no colours of its own: classes, styled by the page's CSS.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence

from lorad.sizes import human_bytes

# ---------------------------------------------------------------------------------------------
# Text


def printable(text: object) -> str:
    """A str as it can be written in UTF-8: a file name's undecodable bytes (lone surrogates from
    os.fsdecode) as \\xHH, as `ls -b` shows them; any other lone surrogate as its escape."""
    s = str(text)
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def esc(text: object) -> str:
    """Escaped for HTML text and for double- or single-quoted attribute values."""
    return html.escape(printable(text), quote=True)


def tail(text: str, width: int) -> str:
    """`text` cut to `width` characters, keeping its end (a module's or path's telling part)."""
    return text if len(text) <= width else "\u2026" + text[-(width - 1) :]


def n(x: float) -> str:
    """A coordinate: at most 1 decimal, no trailing zeros."""
    s = f"{float(x):.1f}"
    return s[:-2] if s.endswith(".0") else s


# ---------------------------------------------------------------------------------------------
# Numbers as the reports print them


def fmt_bytes(b: int | None) -> str:
    return human_bytes(None if b is None else int(b))


def fmt_fro(x: float | None) -> str:
    return "-" if x is None else f"{float(x):.4f}"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{float(x):.1%}"


def fmt_param(x: float | None) -> str:
    return "" if x is None else f"{float(x):g}"


def fmt_count(x: int | None) -> str:
    """Parameter counts: 812, 12.3k, 4.56M."""
    if x is None:
        return "-"
    x = int(x)
    if abs(x) < 1000:
        return str(x)
    if abs(x) < 1_000_000:
        return f"{x / 1000:.3g}k"
    if abs(x) < 1_000_000_000:
        return f"{x / 1_000_000:.3g}M"
    return f"{x / 1_000_000_000:.3g}G"


def saving(before: int | None, after: int | None) -> float | None:
    if not before or after is None:
        return None
    return 1.0 - int(after) / int(before)


# ---------------------------------------------------------------------------------------------
# SVG


def svg(width: float, height: float, body: Iterable[str], label: str, cls: str = "") -> str:
    """An inline chart: scales down with the page (CSS: max-width 100%, height auto)."""
    return (f'<svg class="chart {esc(cls)}" viewBox="0 0 {n(width)} {n(height)}" width="{n(width)}" '
            f'height="{n(height)}" role="img" aria-label="{esc(label)}" preserveAspectRatio="xMinYMin meet">'
            f"<title>{esc(label)}</title>{''.join(body)}</svg>")  # fmt: skip


def rect(x: float, y: float, w: float, h: float, cls: str, title: str | None = None, rx: float = 2) -> str:
    w = max(0.0, float(w))
    tip = f"<title>{esc(title)}</title>" if title else ""
    end = f">{tip}</rect>" if tip else "/>"
    return f'<rect class="{cls}" x="{n(x)}" y="{n(y)}" width="{n(w)}" height="{n(h)}" rx="{n(min(rx, w / 2))}"{end}'


def text(x: float, y: float, content: str, cls: str = "t", anchor: str = "start", title: str | None = None) -> str:
    """`content` is escaped here."""
    tip = f"<title>{esc(title)}</title>" if title else ""
    return f'<text class="{cls}" x="{n(x)}" y="{n(y)}" text-anchor="{anchor}">{tip}{esc(content)}</text>'


def line(x1: float, y1: float, x2: float, y2: float, cls: str) -> str:
    return f'<line class="{cls}" x1="{n(x1)}" y1="{n(y1)}" x2="{n(x2)}" y2="{n(y2)}"/>'


def polyline(points: Sequence[tuple[float, float]], cls: str) -> str:
    pts = " ".join(f"{n(x)},{n(y)}" for x, y in points)
    return f'<polyline class="{cls}" points="{pts}"/>'


def finite(x: object, default: float = 0.0) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default
