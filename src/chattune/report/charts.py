"""Line charts as inline SVG, for pages that must open offline as one file (compare.py's curves).

Plain `<polyline>`s in page coordinates: several runs overlaid with a legend, hover titles on the points,
CJK labels through the page's own fonts, a few kilobytes per chart, and points a test can read back.
"""

from __future__ import annotations

import math

from chattune.report.blocks import esc
from chattune.report.reader import NOT_RECORDED

# Colour-blind-safe categorical palette (Okabe-Ito, then Tableau's); runs beyond it reuse colours.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


PALETTE += ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"]


FONTS = 'system-ui,"Noto Sans CJK SC","Source Han Sans SC","PingFang SC","Microsoft YaHei",sans-serif'


def _nice_ticks(lo: float, hi: float, n: int = 5, *, whole: bool = False) -> list[float]:
    """About `n` round tick values (1, 2, 5 x 10^k apart) covering [lo, hi]; whole numbers with `whole`."""
    if hi <= lo:  # one value (a constant learning rate): an axis 10 % either side of it
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, lo + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(step, 1) if whole else step
    first = math.floor(lo / step) * step
    count = math.ceil((hi - first) / step - 1e-9)
    return [first + i * step for i in range(count + 1)]


def _tick_label(value: float) -> str:
    if value != 0 and abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    if value != 0 and abs(value) >= 1e4:
        return f"{value / 1e3:g}k"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.3g}"
    return f"{round(value, 10):g}"


def svg_chart(title: str, x_label: str, series: list[tuple[str, str, list[tuple[float, float]]]]) -> str:
    """A line chart as an inline <svg>: one <polyline> per series (label, colour, [(x, y)...]), in the
    series' order, with markers and hover titles when points are few. Axes start at the data's range."""
    width, height = 600, 340
    left, right, top, bottom = 64, 16, 34, 52 + 18 * math.ceil(len(series) / 3)
    height += bottom - 52
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    x_ticks = _nice_ticks(min(xs), max(xs), whole=all(float(x).is_integer() for x in xs))
    y_ticks = _nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{esc(title)}" font-family=\'{FONTS}\' font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="600">{esc(title)}</text>',
    ]
    for t in y_ticks:
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t)}</text>')
    for t in x_ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#f0f1f3"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_tick_label(t)}</text>')
    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9ca3af"/>'
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 34}" text-anchor="middle">{esc(x_label)}</text>'
    )
    for label, color, pts in series:
        if not pts:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(
            f'<polyline data-run="{esc(label)}" points="{coords}" fill="none" stroke="{color}" '
            'stroke-width="1.8" stroke-linejoin="round"/>'
        )
        if len(pts) <= 40:
            for x, y in pts:
                out.append(
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.8" fill="{color}">'
                    f"<title>{esc(label)}: {_tick_label(x)} → {y:.4g}</title></circle>"
                )
    for i, (label, color, pts) in enumerate(series):  # legend under the plot, three runs a line
        lx, ly = left + (i % 3) * (plot_w / 3), top + plot_h + 52 + 18 * (i // 3)
        missing = "" if pts else f" ({NOT_RECORDED})"
        out.append(
            f'<line x1="{lx:.1f}" x2="{lx + 18:.1f}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="3"/>'
            f'<text x="{lx + 24:.1f}" y="{ly}">{esc(label + missing)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)
