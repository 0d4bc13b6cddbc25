"""The profile report: one self-contained HTML file (no network, no script) of a profile's analysis.

Plots are inline SVG and PNG heatmaps (report.charts); the file is written to a temporary name, then
renamed.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from moescope.analysis.accuracy import accuracy_lines
from moescope.analysis.analyse import Analysis
from moescope.analysis.balance import hist_quantile
from moescope.analysis.tiers import TIERS
from moescope.output import write_atomic
from moescope.profiling.store import HIST_EDGES, Profile
from moescope.report.charts import Chart, colour_scale, diverging, heatmap, layer_ticks
from moescope.report.text import balance_cells, summary_lines

TIER_COLOURS = ("#b2182b", "#4393c3", "#fdb863", "#555555")
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}svg{display:block;margin:8px 0}
svg text{font:11px system-ui,sans-serif;fill:#333}.note{color:#555}.missing{background:#fff4e5;padding:8px 12px}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:right}"""



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


def report_html(profile: Profile, analysis: Analysis, accuracy: dict | None = None) -> str:
    """The whole report as one HTML string."""
    names = [str(x["layer"]) for x in analysis.layers]
    model = profile.model.model_type or "model"
    missing = "".join(f"<li>{html.escape(m)}</li>" for m in analysis.missing)
    body = [f"<h1>moescope report: {html.escape(str(model))}</h1>",
            f"<p class=note>Profile of {html.escape(str(profile.model.source or 'unknown source'))}, "
            f"config {html.escape(str(profile.model.config_hash))}, calibration "
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
    write_atomic(out, report_html(profile, analysis, accuracy))
