"""The analysis in plain words and tables: what `moescope stats` prints and the report's summary."""

from __future__ import annotations

from moescope.analysis.analyse import Analysis


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(value, ci, digits: int = 2, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if not ci or ci[0] is None:
        return f"{value * scale:.{digits}f}"
    return f"{value * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


BALANCE_DIGITS = {"entropy_ratio": 3, "gini": 2, "top_ratio": 2}  # entropy ratios sit close to 1


def balance_cells(layer: dict) -> list[str]:
    """Entropy ratio, Gini and top-n ratio of one layer entry, each with its interval when there is one."""
    return [_interval(layer[key], layer[f"{key}_ci"], digits) for key, digits in BALANCE_DIGITS.items()]


def summary_lines(analysis: Analysis) -> list[str]:
    """The model-level figures in plain words (also the report's summary)."""
    s = analysis.summary
    mean = s["mean"]
    lines = [
        f"{s['prompts']} prompts, {s['tokens']['prefill']} prefill + {s['tokens']['generation']} generation tokens, "
        f"{s['layers']} MoE layers, {s['experts']} experts in all.",
        f"Dead: {s['dead']} experts never chosen ({s['dead'] / s['experts']:.1%}); {s['near_dead']} more are "
        f"chosen below the near-dead threshold.",
        f"Not yet seen: about {_interval(s['unseen'], s['unseen_ci'], 1)} of the dead experts are likely used but "
        f"missed by this sample, so about {_interval(s['unused'], s['unused_ci'], 1)} are truly unused (Chao2, 95 % "
        "intervals)." if s["dead"] else "Not yet seen: none (no expert is dead).",
        f"The {s['prompts']} prompts already reveal {s['coverage_target']:.0%} of the estimated live experts in every "
        f"layer; about {s['prompts_needed']} would (mean over prompt orderings)." if s["prompts_needed"] <= s["prompts"]
        else f"About {s['prompts_needed']} prompts would reveal "
        f"{s['coverage_target']:.0%} of the estimated live experts in every layer ({s['prompts']} profiled).",
    ]
    if not s["prompts"]:  # counts without prompts (an engine's summed dump): nothing to estimate unseen experts from
        lines[2:] = []
    v = s["validation"]
    if v:
        lines.append(f"Check: from half the prompts ({v['prompts_used']}) the estimator expected "
                     f"{v['predicted_total']:.1f} new experts from the other half, which revealed "
                     f"{v['actual_total']:.1f} (mean error per layer {v['mae']:.2f}, vs {v['naive_mae']:.2f} for "
                     "assuming nothing new).")
    if mean:
        ci = s["mean_ci"]
        lines.append(f"Balance: entropy ratio {_interval(mean.get('entropy_ratio'), ci.get('entropy_ratio'), 3)} "
                     f"(1 = even), Gini {_interval(mean.get('gini'), ci.get('gini'))} (0 = even); the top 10 % of "
                     f"experts take {_interval(mean.get('top_ratio'), ci.get('top_ratio'))}x their fair share"
                     + (" (layer means, 95 % bootstrap intervals over prompts)." if ci else "."))
    if mean.get("topk_entropy_ratio") is not None:
        lines.append(f"Confidence: a token's top-k weights have {_fmt(mean['topk_entropy_ratio'])} of the maximum "
                     "entropy ln k (1 = split evenly, low = one expert dominates).")
    if s["weight_p50"] is not None:  # None: the profile has no routing weights (see "Not shown")
        lines.append(f"Routing weights: median {_fmt(s['weight_p50'], 3)}, P95 {_fmt(s['weight_p95'], 3)}, "
                     f"P99 {_fmt(s['weight_p99'], 3)}.")
    tiers = s["tiers"]
    lines.append("Tiers: " + ", ".join(f"{count} {name}" for name, count in tiers.items()) + ".")
    found = [(x["layer"], c) for x in analysis.layers for c in x.get("clusters", [])]
    if found:
        layer, biggest = max(found, key=lambda item: len(item[1]))
        lines.append(f"Co-activation: {len(found)} clusters of experts chosen together; the largest is layer "
                     f"{layer} experts {', '.join(map(str, biggest))}.")
    return lines + [f"Not shown: {m}." for m in analysis.missing]


def print_tables(analysis: Analysis, console=None) -> None:
    """The per-layer table and the summary, with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    load = Table(title="load per MoE layer", header_style="bold")
    for name in ("layer", "E", "k", "dead", "near", "touched %", "H/lnE", "Gini", "top", "Hk/lnk", "tiers c/s/d/p"):
        load.add_column(name, justify="right")
    detail = Table(title="weights, unseen experts and specificity", header_style="bold")
    for name in ("layer", "P50", "P95", "P99", "unseen", "need", "domain", "lang"):
        detail.add_column(name, justify="left" if name in ("domain", "lang") else "right")
    for x in analysis.layers:
        spec = {kind: (f"{x['specificity'][kind]['max']:.2f} #{x['specificity'][kind]['expert']} "
                       f"{x['specificity'][kind]['favours']}" if x["specificity"][kind]["max"] is not None else "-")
                for kind in ("domain", "lang")}
        load.add_row(str(x["layer"]), str(x["num_experts"]), str(x["top_k"]), str(x["dead"]), str(x["near_dead"]),
                     _interval(x["touched"], x["touched_ci"], 1, 100),
                     *balance_cells(x),
                     _fmt(x["topk_entropy_ratio"]), "/".join(map(str, x["tiers"].values())))
        detail.add_row(str(x["layer"]), _fmt(x["weight_p50"], 3), _fmt(x["weight_p95"], 3), _fmt(x["weight_p99"], 3),
                       _interval(x["unseen"], x["unseen_ci"], 1), str(x["prompts_needed"]), spec["domain"],
                       spec["lang"])
    console.print(load)
    console.print(detail)
    for line in summary_lines(analysis):
        console.print(line, highlight=False)


