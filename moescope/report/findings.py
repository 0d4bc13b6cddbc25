"""The demo's findings: the seeds' claims, each next to what the run measured, and the index page."""

from __future__ import annotations

import json

from moescope.report.charts import REPAIRED


def findings(stages: dict) -> list[dict]:
    """The seeds' claims, each next to what this run measured and whether it agrees."""
    report, prune, quant = stages["report"], stages["prune"], stages["quantize"]
    experts = report["experts"]
    tiered, row = quant["plans"]["tiered"], prune["replay"]
    return [
        {"claim": "Conclusions about dead experts depend on sample size (5 prompts: 30 % look dead; 100: 0.6 %).",
         "measured": f"experts never chosen, mean over prompt orderings: {report['dead_at_1_prompt']:.2f} of "
                     f"{experts} after 1 prompt, {report['dead_at_5_prompts']:.2f} after 5, "
                     f"{report['dead_at_all_prompts']:.2f} after all {report['prompts']}",
         "agrees": report["dead_at_1_prompt"] > report["dead_at_5_prompts"] > report["dead_at_all_prompts"]},
        {"claim": "Routing is uneven but not sparse: almost every expert is used, some far more than others.",
         "measured": f"{report['dead']} of {experts} experts never chosen; busiest 10 % get up to "
                     f"{report['top_ratio']:.2f}x their fair share; lowest entropy ratio {report['entropy_ratio']:.3f}",
         "agrees": report["dead"] <= 0.01 * experts and report["top_ratio"] > 1.2},
        {"claim": "Activation frequency is a poor proxy for importance when pruning.",
         "measured": f"at {prune['ratio_compared']:.0%} removed, {prune['best_criterion']} loses "
                     f"{prune['loss_by_criterion'][prune['best_criterion']]:+.1%} perplexity vs frequency's "
                     f"{prune['loss_by_criterion']['frequency']:+.1%}",
         "agrees": prune["best_vs_frequency"] is not None and prune["best_vs_frequency"] < 1},
        {"claim": "English-only calibration biases pruning against other languages and domains.",
         "measured": f"frequency pruning at {stages['settings']['bad_ratio']:.0%} from English-only calibration: "
                     f"{prune['english_worst_group']} perplexity x{prune['english_worst_ratio']:.2f} worse than from "
                     "the full set",
         "agrees": prune["english_worst_ratio"] > 1.05},
        {"claim": "Tiered precision (8/4/2 bits) costs far less than pruning (+0.5 % vs +1,220 % at 5 %).",
         "measured": f"tiered at {tiered['average_bits']:.2f} average bits: {tiered['loss']:+.1%} perplexity; "
                     f"removing {prune['smallest_ratio']:.0%} of experts by frequency: "
                     f"{prune['frequency_loss_at_smallest']:+.1%}",
         "agrees": tiered["loss"] < prune["frequency_loss_at_smallest"]},
        {"claim": "Setting a router row to -1e9 does not prune an expert.",
         "measured": f"{row['row_1e9']} selections ({row['row_1e9_share']:.1%}) still went to the 'pruned' experts; "
                     f"run-time mask: {row['mask']}, removal: {row['remove']}",
         "agrees": row["row_1e9"] > 0 and row["mask"] == 0 and row["remove"] == 0},
    ] + merge_findings(stages.get("merge"))


def merge_findings(merge: dict | None) -> list[dict]:
    """Removal against merging at equal expert counts, and what router repair recovers (the merge stage)."""
    if not merge:
        return []
    points, removal = merge["points"], f"remove {merge['criterion']}"

    def loss(point: dict, variant: str) -> float:
        return point["variants"][variant]["loss"]

    def best(point: dict, variant: str) -> float:
        return min(loss(point, variant), loss(point, variant + REPAIRED))

    def recovered(point: dict, variant: str) -> float:
        plain = loss(point, variant)
        return 1 - loss(point, variant + REPAIRED) / plain if plain > 0 else 0.0

    compared = "; ".join(
        f"{float(ratio):.0%} fewer: removal ({merge['criterion']}) {loss(p, removal):+.1%}, with repair "
        f"{loss(p, removal + REPAIRED):+.1%}; merging ({p['merge'].removeprefix('merge ')}) "
        f"{loss(p, p['merge']):+.1%}, with repair {loss(p, p['merge'] + REPAIRED):+.1%}; best: {p['winner']}"
        for ratio, p in points.items())
    shares = [recovered(p, v) for p in points.values() for v in (removal, p["merge"])]
    repaired = "; ".join(f"{float(ratio):.0%} fewer: {recovered(p, removal):.0%} of removal's loss, "
                         f"{recovered(p, p['merge']):.0%} of merging's" for ratio, p in points.items())
    return [
        {"claim": "Merging experts loses less quality than removing them at the same expert count (HC-SMoE, "
                  "M-SMoE, REAM); REAP argues the opposite.",
         "measured": f"perplexity change, geometric mean over domains and languages: {compared}",
         "agrees": all(best(p, p["merge"]) < best(p, removal) for p in points.values())},
        {"claim": "Refitting only the router recovers much (here: at least a quarter on average) of the loss "
                  "after pruning or merging (Hyeon and Do, 2026).",
         "measured": f"router repair recovered {repaired} (mean {sum(shares) / len(shares):.0%})",
         "agrees": all(s > 0 for s in shares) and sum(shares) / len(shares) >= 0.25},
    ]


def mlx_findings(stages: dict) -> list[dict]:
    """The row of the demo's MLX stage (none when the moescope[mlx] extra is not installed)."""
    if "mlx" not in stages:
        return []
    run = stages["mlx"]
    mb = 1e6
    return [
        {"claim": "The seeds profiled and compressed their MoE under MLX: what is measured in torch is what MLX "
                  "serves.",
         "measured": f"MLX profile: {run['selections_differing']} of {run['selections']} selections differ from "
                     f"torch's; tiered plan served by mlx-lm at {run['served_bits']:.2f} bits per expert weight "
                     f"(planned {run['tiered_bits']:.2f}), {run['disk_bytes'] / mb:.2f} MB on disk (experts "
                     f"{run['expert_disk_bytes'] / mb:.2f} MB, arithmetic {run['expert_planned_bytes'] / mb:.2f} MB): "
                     f"{run['served_loss']:+.2%} perplexity vs the original, torch predicted "
                     f"{run['predicted_loss']:+.2%}",
         "agrees": run["selections_differing"] == 0
                   and abs(run["served_perplexity"] / run["predicted_perplexity"] - 1) < 1e-3},
    ]


def index_html(stages: dict, rows: list[dict]) -> str:
    import html

    e = html.escape
    table = "".join(
        f"<tr><td>{e(r['claim'])}</td><td>{e(r['measured'])}</td>"
        f"<td class='{'yes' if r['agrees'] else 'no'}'>{'agrees' if r['agrees'] else 'differs'}</td></tr>"
        for r in rows)
    quant = "".join(f"<tr><td>{e(name)}</td><td>{p['average_bits']:.2f}</td><td>{p['loss']:+.2%}</td></tr>"
                    for name, p in stages["quantize"]["plans"].items())
    gates = "".join(f"<li><a href='gate/gate-{name}.html'>{e(name)} model</a>: <b>{e(g['verdict'])}</b> "
                    f"({e(json.dumps(g['prompts_by_verdict']))})</li>" for name, g in stages["gate"].items()
                    if isinstance(g, dict))
    seconds = sum(s.get("seconds", 0) for s in stages.values() if isinstance(s, dict))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>moescope demo</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;width:100%;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.4em .6em;
vertical-align:top;text-align:left}}th{{background:#f3f3f3}}.yes{{background:#dff3df}}.no{{background:#f8dede}}
</style></head><body>
<h1>moescope demo: what the embedded model shows</h1>
<p>Every figure below was measured by this run ({seconds:.0f} s of pipeline on this machine). Model:
the embedded Qwen3-MoE demo (moescope/assets/demo-moe); data: the embedded calibration, held-out and probe
sets.</p>
<h2>Findings</h2><table><tr><th>The seeds' claim</th><th>This run measured</th><th></th></tr>{table}</table>
<h2>Quantisation plans (perplexity vs the unquantised model, geometric mean over domains)</h2>
<table><tr><th>plan</th><th>average bits</th><th>perplexity change</th></tr>{quant}</table>
<h2>Regression gate</h2><ul>{gates}</ul>
<h2>Details</h2><ul>
<li><a href="report/report.html">Routing report</a> (error bars, sample-size curve, tiers, accuracy per expert)</li>
<li>Pruning sweep: <a href="prune/sweep.svg">plot</a>, <a href="prune/sweep.csv">table</a>;
<a href="prune/sweep-english.csv">English-only calibration</a></li>
<li>Removal vs merging, with and without router repair: <a href="merge/sweep.svg">plot</a>,
<a href="merge/sweep.csv">table</a></li>
<li><a href="findings.json">findings.json</a> (this table, machine-readable)</li></ul>
</body></html>
"""
