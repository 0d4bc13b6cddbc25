"""Charts without a plotting library: hand-written SVG, and PNG heatmaps made here with zlib.

The large heatmaps (layer x expert load, expert x expert co-activation) are PNG data URIs inside the
SVG, so a 60 x 512 model draws as fast as a toy; everything else is plain SVG text.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib

import numpy as np

from moescope.judge.nll import geometric_mean

BLUE, WHITE, RED = np.array([33, 102, 172]), np.array([247, 247, 247]), np.array([178, 24, 43])


def png_data_uri(rgb: np.ndarray) -> str:
    """A uint8 [H, W, 3] image as a PNG data URI (filter 0, zlib)."""
    height, width, _ = rgb.shape
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def diverging(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 RGB: blue at `low`, near-white at the midpoint, red at `high`; NaN light grey."""
    t = np.clip((np.nan_to_num(values, nan=(low + high) / 2) - low) / (high - low), 0, 1)[..., None] * 2 - 1
    rgb = np.where(t < 0, WHITE + (BLUE - WHITE) * -t, WHITE + (RED - WHITE) * t)
    return np.where(np.isnan(values)[..., None], 220, rgb).astype(np.uint8)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= count)
    return [float(v) for v in np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step)]


def _label(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"


class Chart:
    """One SVG plot: maps data to pixels; each drawing method appends SVG elements, `svg()` returns the plot."""

    def __init__(self, xlim, ylim, width=760, height=260, log_x=False, left=58, bottom=36, top=26):
        self.xlim, self.ylim, self.log_x = xlim, ylim, log_x
        self.width, self.height, self.left, self.bottom, self.top = width, height, left, bottom, top
        self.parts: list[str] = []

    def x(self, v):
        lo, hi = (np.log10(self.xlim) if self.log_x else self.xlim)
        v = np.log10(v) if self.log_x else np.asarray(v, dtype=float)
        return self.left + (v - lo) / (hi - lo or 1) * (self.width - self.left - 12)

    def y(self, v):
        lo, hi = self.ylim
        span = self.height - self.bottom - self.top
        return self.top + (1 - (np.asarray(v, dtype=float) - lo) / (hi - lo or 1)) * span

    def axes(self, xlabel: str, ylabel: str, xticks: list[tuple[float, str]] | None = None) -> None:
        """Axis lines, tick labels (`xticks` as (position, label); default: round values) and titles."""
        x0, x1, y0, y1 = self.x(self.xlim[0]), self.x(self.xlim[1]), self.y(self.ylim[0]), self.y(self.ylim[1])
        out = [f'<path d="M{x0:.1f},{y1:.1f}V{y0:.1f}H{x1:.1f}" fill="none" stroke="#888"/>']
        if xticks is None:
            decades = [10.0**e for e in range(math.floor(math.log10(self.xlim[0])), 3)
                       if self.xlim[0] <= 10.0**e <= self.xlim[1]] if self.log_x else []
            xticks = [(t, _label(t)) for t in (decades if len(decades) > 1 else nice_ticks(*self.xlim))]
        for t, label in xticks:
            out.append(f'<text x="{self.x(t):.1f}" y="{y0 + 14:.1f}" text-anchor="middle">{html.escape(label)}</text>')
        for t in nice_ticks(*self.ylim):
            out.append(f'<text x="{x0 - 5:.1f}" y="{self.y(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{self.height - 4}" text-anchor="middle">{html.escape(xlabel)}'
                   "</text>")
        out.append(f'<text transform="translate(12,{(y0 + y1) / 2:.1f}) rotate(-90)" text-anchor="middle">'
                   f"{html.escape(ylabel)}</text>")
        self.parts += out

    def line(self, xs, ys, colour: str, dash: str = "", title: str = "") -> None:
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(self.x(xs), self.y(ys)) if np.isfinite(b))
        tip = f"<title>{html.escape(title)}</title>" if title else ""
        self.parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2" '
                          f'stroke-dasharray="{dash}">{tip}</polyline>')

    def band(self, xs, lo, hi, colour: str) -> None:
        xs = self.x(xs)
        points = [f"{a:.1f},{b:.1f}" for a, b in zip(xs, self.y(hi))] + \
                 [f"{a:.1f},{b:.1f}" for a, b in zip(xs[::-1], self.y(lo)[::-1])]
        self.parts.append(f'<polygon points="{" ".join(points)}" fill="{colour}" fill-opacity="0.3" stroke="none"/>')

    def bars(self, left, right, bottom, top, colour: str, titles=None) -> None:
        for i, (a, b, c, d) in enumerate(zip(self.x(left), self.x(right), self.y(bottom), self.y(top))):
            tip = f"<title>{html.escape(titles[i])}</title>" if titles else ""
            self.parts.append(f'<rect x="{a:.1f}" y="{d:.1f}" width="{max(b - a - 0.5, 0.5):.1f}" '
                              f'height="{max(c - d, 0):.1f}" fill="{colour}">{tip}</rect>')

    def legend(self, items: list[tuple[str, str]]) -> None:
        for i, (name, colour) in enumerate(items):
            x = self.left + 10 + 130 * i
            self.parts.append(f'<rect x="{x}" y="4" width="12" height="12" fill="{colour}"/>'
                              f'<text x="{x + 16}" y="14">{html.escape(name)}</text>')

    def svg(self) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}">{"".join(self.parts)}</svg>')


def layer_ticks(names: list[str], offset: float = 0.0) -> list[tuple[float, str]]:
    """At most ~12 layer labels, at positions i + offset."""
    step = max(1, math.ceil(len(names) / 12))
    return [(i + offset, names[i]) for i in range(0, len(names), step)]


def heatmap(rgb: np.ndarray, xlabel: str, ylabel: str, ylabels: list[str], width: int = 1000,
            row_height: int = 10) -> str:
    """An image heatmap (rows top to bottom) with axis labels, as SVG."""
    rows, cols, _ = rgb.shape
    left, plot_w, plot_h = 58, width - 70, max(rows * row_height, 120)
    step = max(1, rows // 12)
    labels = "".join(f'<text x="{left - 5}" y="{8 + (r + 0.5) * plot_h / rows + 4:.1f}" text-anchor="end">'
                     f"{html.escape(ylabels[r])}</text>" for r in range(0, rows, step))
    xticks = "".join(f'<text x="{left + (c + 0.5) * plot_w / cols:.1f}" y="{plot_h + 22}" text-anchor="middle">'
                     f"{c:.0f}</text>" for c in nice_ticks(0, cols - 1) if c == int(c))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{plot_h + 44}">'
            f'<image x="{left}" y="8" width="{plot_w}" height="{plot_h}" preserveAspectRatio="none" '
            f'style="image-rendering:pixelated" href="{png_data_uri(rgb)}"/>{labels}{xticks}'
            f'<text x="{left + plot_w / 2:.1f}" y="{plot_h + 40}" text-anchor="middle">{html.escape(xlabel)}</text>'
            f'<text transform="translate(12,{8 + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
            f"{html.escape(ylabel)}</text></svg>")


def colour_scale(low: str, mid: str, high: str) -> str:
    """A small legend bar for the diverging colour map."""
    stops = diverging(np.linspace(-1, 1, 64)[None, :], -1, 1)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="420" height="34"><image x="60" y="4" width="300" '
            f'height="12" preserveAspectRatio="none" href="{png_data_uri(stops)}"/>'
            f'<text x="60" y="30">{low}</text><text x="210" y="30" text-anchor="middle">{mid}</text>'
            f'<text x="360" y="30" text-anchor="end">{high}</text></svg>')


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
REPAIRED = " +repair"  # a series name ending so is drawn dashed, in the colour of the series it repairs


def series_styles(names: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, dash) of each series: one colour per base series; its repaired variant dashed."""
    bases = list(dict.fromkeys(name.removesuffix(REPAIRED) for name in names))
    return {name: (COLOURS[bases.index(name.removesuffix(REPAIRED)) % len(COLOURS)],
                   "6,3" if name.endswith(REPAIRED) else "") for name in names}


def legend_strip(items: dict[str, tuple[str, str]], width: int, item_width: int = 190) -> tuple[str, int]:
    """A legend of coloured line samples wrapping over rows of `width` pixels; (SVG, height)."""
    per_row = max(1, width // item_width)
    parts = []
    for i, (name, (colour, dash)) in enumerate(items.items()):
        x, y = 10 + item_width * (i % per_row), 14 + 18 * (i // per_row)
        parts.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 22}" y2="{y - 4}" stroke="{colour}" stroke-width="2" '
                     f'stroke-dasharray="{dash}"/><text x="{x + 28}" y="{y}">{html.escape(name)}</text>')
    return "".join(parts), 18 * ((len(items) + per_row - 1) // per_row) + 6


def plot_sweep(rows: list[dict], x: str = "ratio", series: str = "criterion",
               xlabel: str = "share of experts removed per layer", reference: str = "unpruned") -> str:
    """One SVG: a panel per domain (geometric mean over its languages) and, when there are several
    languages, a panel per language (geometric mean over its domains): perplexity relative to the
    reference model against `x`, one line per `series`; rows whose series is "none" (the reference
    itself) join every line. One legend above the panels."""
    names = list(dict.fromkeys(r[series] for r in rows if r[series] != "none"))
    styles = series_styles(names)
    langs = sorted({r["lang"] for r in rows})
    panels = [("domain", d) for d in sorted({r["domain"] for r in rows})] + \
        ([("lang", g) for g in langs] if len(langs) > 1 else [])
    curves = {}
    for name in names:
        xs = sorted({r[x] for r in rows if r[series] in (name, "none")})
        for key, value in panels:
            curves[(name, value)] = (xs, [geometric_mean([r["vs_baseline"] for r in rows if r[key] == value
                                                          and r[x] == v and r[series] in (name, "none")]) for v in xs])
    every_x = [v for xs, _ in curves.values() for v in xs]
    top = max(max(ys) for _, ys in curves.values())
    bottom = min(1.0, min(min(ys) for _, ys in curves.values()))
    width, height, columns = 420, 240, 2
    legend, legend_height = legend_strip(styles, columns * width)
    svgs = []
    for i, (key, value) in enumerate(panels):
        chart = Chart((min(every_x), max(every_x)), (bottom, top * 1.05), width=width, height=height, top=12)
        chart.axes(xlabel, f"{key} {value}: perplexity / {reference}")
        for name in names:
            chart.line(*curves[(name, value)], styles[name][0], styles[name][1], title=name)
        left, y = (i % columns) * width, legend_height + (i // columns) * height
        svgs.append(chart.svg().replace("<svg ", f'<svg x="{left}" y="{y}" ', 1))
    rows_needed = (len(panels) + columns - 1) // columns
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{columns * width}" '
            f'height="{legend_height + rows_needed * height}" style="font: 11px sans-serif">{legend}{"".join(svgs)}'
            "</svg>\n")
