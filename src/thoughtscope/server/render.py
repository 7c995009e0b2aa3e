"""Presentation helpers for the templates: token heat colours, inline SVG histograms and curves, number formats.

Everything is drawn server-side as HTML/SVG (no plotting library in the browser, nothing fetched).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from ..display import window_pieces

HERE = Path(__file__).resolve().parent


def heat(act: float, scale: float) -> str:
    """Background colour of a token: white at 0, deep orange at `scale` (the feature's max activation)."""
    if not act or act <= 0 or scale <= 0:
        return ""
    t = min(1.0, act / scale)
    return f"background:rgba(234,88,12,{0.12 + 0.78 * t:.2f})"


def err_heat(e: float, scale: float) -> str:
    """Blue shading for the reconstruction-error view."""
    if scale <= 0 or e is None or not math.isfinite(e):
        return ""
    t = min(1.0, max(0.0, e / scale))
    return f"background:rgba(37,99,235,{0.08 + 0.72 * t:.2f})"


CONTROL = {i: 0x2400 + i for i in range(32)} | {10: "⏎", 9: "⇥", 127: "␡"}  # control characters as their symbols


def show_token(s: str) -> str:
    """Visible whitespace and control characters (newline ⏎, escape ␛), so a token never disappears.

    Text is shown by pieces (`thoughtscope.display`), whole characters, so "" is only a token that decodes to
    nothing at all (a sentencepiece word marker alone, a special token a tokenizer drops): shown as ∅.
    """
    return s.translate(CONTROL) if s else "∅"


def show_lone_token(s: str) -> str:
    """A token shown alone in a cell (a lens's or a patched run's prediction): one made only of spaces shows each
    as ␣ (a no-break space as ⍽), so a cell never looks empty; otherwise as `show_token`."""
    if s and not s.strip():
        s = s.replace(" ", "␣").replace("\xa0", "⍽")
    return show_token(s)


def piece_title(values: Sequence[float], lead: str = "") -> str:
    """A piece's tooltip: its value, or each token's value when one character spans several tokens."""
    head = f"{lead} " if lead else ""
    if len(values) == 1:
        return head + fmt(values[0])
    return head + f"{fmt(max(values))} (one character over {len(values)} tokens: {', '.join(fmt(v) for v in values)})"


CUT_NOTE = " (bytes of a character cut off at the context's edge)"


def context_pieces(tokenizer, tokens: Sequence[int], acts: dict[int, float], peak: int) -> list[dict]:
    """The pieces of a context that cover the positions in `acts` (its window), each whole: text, positions,
    the strongest activation of its tokens (its colour), each token's activation, whether the peak is in it."""
    if not acts:
        return []
    out = []
    for pc in window_pieces(tokenizer, tokens, min(acts), max(acts)):
        pos = list(pc.positions)
        vals = [acts[q] for q in pos if q in acts]
        out.append(
            {
                "text": pc.text,
                "positions": pos,
                "act": max(vals) if vals else 0.0,
                "acts": [[q, acts[q]] for q in pos if q in acts],
                "peak": peak in pos,
                "title": (piece_title(vals) if vals else "") + (CUT_NOTE if pc.cut else ""),
            }
        )
    return out


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}g}"
    return str(x)


def histogram_svg(counts, edges, width: int = 520, height: int = 120) -> Markup:
    """Bars of the non-empty range of a log-binned histogram, with the bin edges as axis labels."""
    counts = [int(c) for c in counts]
    nz = [i for i, c in enumerate(counts) if c > 0]
    if not nz:
        return Markup('<p class="muted">never active on the atlas corpus</p>')
    lo, hi = nz[0], nz[-1] + 1
    cs = counts[lo:hi]
    m = max(cs)
    bw = width / len(cs)
    bars = []
    for j, c in enumerate(cs):
        h = (height - 22) * (math.log1p(c) / math.log1p(m))
        a, b = float(edges[lo + j]), float(edges[lo + j + 1])
        bars.append(
            f'<rect x="{j * bw + 1:.1f}" y="{height - 18 - h:.1f}" width="{max(bw - 2, 1):.1f}" '
            f'height="{h:.1f}" rx="1.5"><title>{fmt(a)}–{fmt(b)}: {c:,} tokens</title></rect>'
        )
    labels = (
        f'<text x="0" y="{height - 4}">{fmt(float(edges[lo]), 2)}</text>'
        f'<text x="{width}" y="{height - 4}" text-anchor="end">{fmt(float(edges[hi]), 2)}</text>'
    )
    return Markup(
        f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" aria-label="activation histogram">'
        f"{''.join(bars)}{labels}</svg>"
    )


def curve_svg(points, baseline_ppl: float, width: int = 160, height: int = 48) -> Markup:
    """Calibration of a slider from a sweep: concept rate (solid) and perplexity ratio (dashed) per strength."""
    if not points:
        return Markup("")
    xs = [p[0] for p in points]
    x0, x1 = min(xs), max(xs)
    sx = (lambda x: 4 + (width - 8) * (x - x0) / (x1 - x0)) if x1 > x0 else (lambda x: width / 2)
    rate = " ".join(f"{sx(s):.1f},{height - 4 - (height - 8) * r:.1f}" for s, r, _ in points)
    ratios = [p / baseline_ppl if baseline_ppl else 1.0 for _, _, p in points]
    rmax = max(max(ratios), 2.0)
    ppl = " ".join(f"{sx(s):.1f},{height - 4 - (height - 8) * (q / rmax):.1f}" for (s, _, _), q in zip(points, ratios))
    tip = "; ".join(f"{s:g}: rate {r:.2f}, ppl ×{q:.2f}" for (s, r, _), q in zip(points, ratios))
    return Markup(
        f'<svg class="curve" viewBox="0 0 {width} {height}"><title>{html.escape(tip)}</title>'
        f'<polyline class="rate" points="{rate}"/><polyline class="ppl" points="{ppl}"/></svg>'
    )


def make_env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fmt=fmt, tok=show_token, lone=show_lone_token)
    env.globals.update(heat=heat, err_heat=err_heat, histogram_svg=histogram_svg, curve_svg=curve_svg)
    return env
