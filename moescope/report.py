"""`moescope report PROFILE --out report.html`: one self-contained HTML file, no network, no script.

Plots are hand-written inline SVG; the two large heatmaps (layer x expert load, expert x expert
co-activation) are PNGs made here with zlib and embedded as data URIs inside the SVG, so a
60 x 512 model draws as fast as a toy. The file is written to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from moescope.metrics import Analysis, analyse, hist_quantile
from moescope.output import write_atomic
from moescope.stats import HIST_EDGES, Profile
from moescope.stats_cli import add_stats_arguments, balance_cells, stats_options, summary_lines
from moescope.tiers import TIERS

TIER_COLOURS = ("#b2182b", "#4393c3", "#fdb863", "#555555")
BLUE, WHITE, RED = np.array([33, 102, 172]), np.array([247, 247, 247]), np.array([178, 24, 43])
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}svg{display:block;margin:8px 0}
svg text{font:11px system-ui,sans-serif;fill:#333}.note{color:#555}.missing{background:#fff4e5;padding:8px 12px}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:right}"""


# ---------------------------------------------------------------- drawing


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


# ---------------------------------------------------------------- sections


def load_section(analysis: Analysis, names: list[str]) -> str:
    ratio = analysis.share * np.array([x["num_experts"] for x in analysis.layers])[:, None]
    with np.errstate(divide="ignore"):
        rgb = diverging(np.log2(ratio), -3, 3)
    rgb[ratio == 0] = 25  # dead: near black
    return ("<h2>Expert load per layer</h2><p class=note>Each cell is an expert's share of its layer's selections "
            "relative to the fair share 1/E (log scale). Black: never chosen.</p>"
            + heatmap(rgb, "expert", "MoE layer", names, row_height=max(2, min(12, 600 // len(names))))
            + colour_scale("1/8 of fair share", "fair share", "8x fair share"))


def curve_section(analysis: Analysis) -> str:
    c, s = analysis.curve, analysis.summary
    if not c:
        return "<h2>Sample size</h2><p class=missing>Needs at least 2 prompts.</p>"
    n = c["n"][1:]
    top = float(max(c["dead_hi"][1:].max(), c["dead_mean"][1:].max(), 1))
    chart = Chart((1, max(n[-1], 2)), (0, top * 1.05))
    chart.axes("prompts profiled (random orderings)", "dead experts (all layers)")
    chart.band(n, c["dead_lo"][1:], c["dead_hi"][1:], "#4393c3")
    chart.line(n, c["dead_mean"][1:], "#2166ac", title="mean over all orderings")
    floor = s["dead"] - (s["unseen"] or 0)
    chart.line([1, n[-1]], [floor, floor], "#b2182b", dash="6 4", title="estimated truly unused (Chao2)")
    chart.legend([("mean", "#2166ac"), ("95 % of orderings", "#9ec5e0"), ("estimated floor", "#b2182b")])
    return ("<h2>Dead experts vs sample size</h2><p class=note>Experts never chosen after the first n prompts: "
            "exact mean over all orderings, band = 95 % of random orderings. The dashed line is where the "
            f"count should settle: {s['dead']} dead now minus about {s['unseen']:.1f} used-but-unseen experts "
            "(Chao2).</p>" + chart.svg())


def balance_section(analysis: Analysis, names: list[str]) -> str:
    """Entropy ratio and Gini per layer, with their bootstrap bands when the profile has them."""
    rows = np.arange(len(names))
    chart = Chart((0, max(len(names) - 1, 1)), (0, 1), height=240)
    chart.axes("MoE layer", "entropy ratio / Gini", xticks=layer_ticks(names))
    for key, colour in (("entropy_ratio", "#2166ac"), ("gini", "#b2182b")):
        ci = np.array([x[f"{key}_ci"] for x in analysis.layers], dtype=float)  # None -> NaN
        if not np.isnan(ci).any():
            chart.band(rows, ci[:, 0], ci[:, 1], colour)
        chart.line(rows, np.array([x[key] for x in analysis.layers], dtype=float), colour, title=key)
    chart.legend([("entropy ratio H/lnE", "#2166ac"), ("Gini", "#b2182b")])
    note = ("bands = 95 % bootstrap intervals over prompts" if analysis.summary["mean_ci"]
            else "no intervals: see what is missing from this profile")
    return ("<h2>Balance per layer</h2><p class=note>Entropy ratio (1 = every expert equally used) and Gini "
            f"(0 = even) of each layer's selections; {note}.</p>" + chart.svg())


def weight_section(analysis: Analysis, names: list[str]) -> str:
    pooled = analysis.weight_hist.sum(0).astype(float)
    if not pooled.sum():
        return "<h2>Routing weights</h2><p class=missing>No routing weights recorded.</p>"
    used = np.flatnonzero(pooled)
    lower = np.concatenate([[HIST_EDGES[0] / 10], HIST_EDGES])
    upper = np.concatenate([HIST_EDGES, [HIST_EDGES[-1] * 1.33]])
    first, last = max(used[0] - 1, 0), min(used[-1] + 1, len(pooled) - 1)  # one empty bin either side
    chart = Chart((lower[first], upper[last]), (0, pooled.max() / pooled.sum() * 1.05), log_x=True)
    chart.axes("routing weight (log scale)", "share of selections")
    keep = slice(first, last + 1)
    chart.bars(lower[keep], upper[keep], np.zeros(last + 1 - first), pooled[keep] / pooled.sum(), "#4393c3",
               [f"{lower[i]:.3g}-{upper[i]:.3g}: {pooled[i] / pooled.sum():.2%}" for i in range(first, last + 1)])
    rows = np.arange(len(names))
    q = {p: hist_quantile(analysis.weight_hist, p / 100) for p in (50, 95, 99)}
    per_layer = Chart((0, max(len(names) - 1, 1)), (0, float(np.nanmax(q[99])) * 1.1))
    per_layer.axes("MoE layer", "routing weight", xticks=layer_ticks(names))
    for p, colour in zip(q, ("#2166ac", "#f4a582", "#b2182b")):
        per_layer.line(rows, q[p], colour, title=f"P{p}")
    per_layer.legend([("median", "#2166ac"), ("P95", "#f4a582"), ("P99", "#b2182b")])
    return ("<h2>Routing weights</h2><p class=note>The weight a chosen expert receives, all layers pooled, "
            "then its median, P95 and P99 per layer (from log-spaced histograms: about 33 % resolution).</p>"
            + chart.svg() + per_layer.svg())


def specificity_section(analysis: Analysis) -> str:
    out = ["<h2>Specificity</h2><p class=note>Jensen-Shannon divergence (bits) between each expert's domain "
           "(language) mix and its layer's: 0 = serves every group in proportion, 1 = serves groups the layer "
           "otherwise barely sees.</p>"]
    for kind in ("domain", "lang"):
        values = analysis.specificity[kind][np.isfinite(analysis.specificity[kind])]
        if not values.size or np.all(values == 0):
            out.append(f"<p class=missing>{kind}: not available (one {kind} only, or no selections).</p>")
            continue
        counts, edges = np.histogram(values, bins=20, range=(0, 1))
        chart = Chart((0, 1), (0, counts.max() * 1.1), height=200)
        chart.axes(f"{kind} specificity (JS divergence, bits)", "experts")
        chart.bars(edges[:-1], edges[1:], np.zeros(20), counts, "#5aae61",
                   [f"{a:.2f}-{b:.2f}: {c} experts" for a, b, c in zip(edges[:-1], edges[1:], counts)])
        out.append(chart.svg())
    return "".join(out)


def tier_section(analysis: Analysis, names: list[str]) -> str:
    counts = np.array([[x["tiers"][t] for t in TIERS] for x in analysis.layers], dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    chart = Chart((0, len(names)), (0, 1), height=240)
    chart.axes("MoE layer", "share of experts", xticks=layer_ticks(names, 0.5))
    bottom = np.zeros(len(names))
    for t, colour in enumerate(TIER_COLOURS):
        chart.bars(np.arange(len(names)), np.arange(len(names)) + 1, bottom, bottom + share[:, t], colour,
                   [f"layer {n}: {int(c)} {TIERS[t]}" for n, c in zip(names, counts[:, t])])
        bottom += share[:, t]
    chart.legend(list(zip(TIERS, TIER_COLOURS)))
    o = analysis.summary["tier_options"]
    return ("<h2>Tiers per layer</h2><p class=note>Load relative to the fair share 1/E: critical &ge; "
            f"{o['critical']}x, standard &ge; {o['standard']}x, deprioritised &ge; {o['prune']}x, prune below "
            f"(bits {'/'.join(map(str, o['bits']))}).</p>" + chart.svg())


def coactivation_section(analysis: Analysis) -> str:
    if analysis.npmi is None:
        return ("<h2>Co-activation</h2><p class=missing>Not recorded: profile with --coactivation to see which "
                "experts are chosen together.</p>")
    sizes = [sum(len(c) for c in x.get("clusters", [])) for x in analysis.layers]
    row = int(np.argmax(sizes))
    e = analysis.layers[row]["num_experts"]
    rgb = diverging(analysis.npmi[row, :e, :e], -1, 1)
    lines = "".join(f"<li>layer {x['layer']}: " + "; ".join("{" + ", ".join(map(str, c)) + "}" for c in x["clusters"])
                    + "</li>" for x in analysis.layers if x.get("clusters"))
    return (f"<h2>Co-activation</h2><p class=note>Normalised PMI of two experts being chosen for the same token in "
            f"layer {analysis.layers[row]['layer']} (the layer with the most clustered experts): red = chosen "
            "together more than chance, blue = less.</p>"
            + heatmap(rgb, "expert", "expert", [str(i) for i in range(e)], width=min(1000, 70 + 8 * e),
                      row_height=max(2, min(8, 600 // e)))
            + colour_scale("-1 never together", "0 independent", "1 always together")
            + (f"<p>Clusters (NPMI &ge; threshold):</p><ul>{lines}</ul>" if lines else "<p>No clusters.</p>"))


def accuracy_section(result: dict) -> str:
    """Per-expert accuracy on labelled items (`moescope accuracy`): one chart per layer, a bar for each
    expert's Wilson interval and a mark at its accuracy; grey where too few items were routed there."""
    from moescope.accuracy import summary_lines as accuracy_lines

    charts = []
    for layer in result["layers"]:
        experts = layer["experts"]
        seen = [x for x in experts if x["items"]]
        chart = Chart((0, len(experts)), (0, 1), height=200)
        chart.axes("expert", f"accuracy, layer {layer['layer']}",
                   xticks=[(i + 0.5, str(i)) for i in range(0, len(experts), max(1, len(experts) // 16))])
        chart.line([0, len(experts)], [result["accuracy"]] * 2, "#888", dash="4 3", title="all items")
        for few, colour in ((False, "#4393c3"), (True, "#cccccc")):
            group = [x for x in seen if x["few"] == few]
            left = [x["expert"] + 0.15 for x in group]
            right = [x["expert"] + 0.85 for x in group]
            titles = [f"expert {x['expert']}: {x['correct']} of {x['items']} right" for x in group]
            chart.bars(left, right, [x["ci"][0] for x in group], [x["ci"][1] for x in group], colour, titles)
            chart.bars(left, right, [x["accuracy"] - 0.006 for x in group], [x["accuracy"] + 0.006 for x in group],
                       "#222", titles)
        charts.append(chart.svg())
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in accuracy_lines(result))
    return ("<h2>Accuracy per expert</h2><p class=note>Labelled multiple-choice items, each counted for the experts "
            "chosen at its answer position (the last question token). Bars: Wilson 95 % intervals; black mark: "
            f"accuracy; grey: fewer than {result['few_items']} items; dashed: all items.</p>"
            f"<ul>{lines}</ul>" + "".join(charts))


def layer_table(analysis: Analysis) -> str:
    head = ("layer", "E", "k", "dead", "near-dead", "unseen", "H/lnE", "Gini", "top ×fair", "P50", "P99",
            "critical")
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
        x["layer"], x["num_experts"], x["top_k"], x["dead"], x["near_dead"], x["unseen"],
        *balance_cells(x),
        x["weight_p50"], x["weight_p99"], len(x["critical"]))) + "</tr>"
        for x in analysis.layers)
    return ("<h2>Per layer</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{rows}</table>")


def render(profile: Profile, analysis: Analysis, accuracy: dict | None = None) -> str:
    """The whole report as one HTML string."""
    names = [str(x["layer"]) for x in analysis.layers]
    model = profile.model.get("model_type", "model")
    missing = "".join(f"<li>{html.escape(m)}</li>" for m in analysis.missing)
    body = [f"<h1>moescope report: {html.escape(str(model))}</h1>",
            f"<p class=note>Profile of {html.escape(str(profile.model.get('source') or 'unknown source'))}, "
            f"config {html.escape(str(profile.model.get('config_hash')))}, calibration "
            f"{html.escape(profile.calibration_hash)}.</p>",
            "<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(analysis))
            + "</ul>",
            f"<div class=missing><b>Missing from this profile:</b><ul>{missing}</ul></div>" if missing else "",
            load_section(analysis, names), curve_section(analysis), balance_section(analysis, names),
            weight_section(analysis, names),
            specificity_section(analysis), tier_section(analysis, names), coactivation_section(analysis),
            accuracy_section(accuracy) if accuracy else "", layer_table(analysis)]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>moescope report: '
            f"{html.escape(str(model))}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(profile: Profile, analysis: Analysis, out: str | Path, accuracy: dict | None = None) -> None:
    """Write the report to `out` through a temporary file, so a reader never sees half a report."""
    write_atomic(out, render(profile, analysis, accuracy))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stats_arguments(parser)
    parser.add_argument("--out", required=True, help="HTML file to write")
    parser.add_argument("--accuracy", metavar="FILE", help="add per-expert accuracy from `moescope accuracy`")


def run(args: argparse.Namespace) -> int:
    from moescope.accuracy import load_accuracy

    accuracy = load_accuracy(args.accuracy) if args.accuracy else None
    profile = Profile.load(args.profile)
    write_report(profile, analyse(profile, stats_options(args)), args.out, accuracy)
    print(f"wrote {args.out}")
    return 0
