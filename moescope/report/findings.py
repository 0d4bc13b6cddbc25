"""The demo's findings: the seeds' claims as experiments, each with its rule stated before the run.

Every finding names the comparison, its threshold and its uncertainty (95 % intervals over prompt
orderings, over calibration prompts or over evaluation windows), shows the seeds' figure beside ours
with magnitudes, and reads "yes", "partly" or "no" by its rule alone. A comparison that cannot tell
(a tiered plan that is uniform, a removal check that watches nothing) says so in its note, on the page.
Each function takes the demo's stage results and nothing else, so planted results test the verdicts.
"""

from __future__ import annotations

from moescope.report.extra_findings import merge_findings, mlx_findings
from moescope.report.verdicts import change, plan_losses, row, span


def sample_size(report: dict) -> dict:
    experts, at = report["experts"], report["dead_at"]
    one, five, every = (at[key]["mean"] / experts for key in ("1", "5", "all"))
    verdict = "yes" if five >= 0.10 and every <= five / 2 else "partly" if one - every >= 0.01 else "no"
    band = [at["5"]["lo"] / experts, at["5"]["hi"] / experts]
    return row(
        "Conclusions about dead experts depend on sample size.",
        "after 5 prompts 30 % of experts look dead; after 100, 0.6 %",
        "Experts never chosen, mean over random prompt orderings (95 % band over orderings), after 1, 5 and all "
        "prompts. yes: at least 10 % look dead after 5 prompts (a third of the seeds' 30 %) and at most half of "
        "that after all; partly: less than that after 5, but the count still falls by at least 1 % of the experts "
        "from 1 prompt to all; no: it falls by less.",
        f"{one:.1%} of {experts} experts look dead after 1 prompt, {span(five, band, '{:.1%}')} after 5, "
        f"{twenty(at, experts)}{every:.1%} after all {report['prompts']}; about {report['prompts_needed']} prompts "
        f"reveal 99 % of the live experts{unseen_check(report.get('unseen_check'))}",
        verdict)


def twenty(at: dict, experts: int) -> str:
    """The curve after 20 prompts, when the run recorded it."""
    if "20" not in at:
        return ""
    point = at["20"]
    return f"{span(point['mean'] / experts, (point['lo'] / experts, point['hi'] / experts), '{:.1%}')} after 20, "


def unseen_check(check: dict | None) -> str:
    """The unseen-expert estimate (Chao2) from half of the prompts against what the other half reveals."""
    if not check:
        return ""
    return (f"; from {check['prompts_used']} prompts the unseen-expert estimate expects {check['predicted_total']:.1f} "
            f"more experts in the other half (mean of {check['splits']} random splits), which reveals "
            f"{check['actual_total']:.1f}")


def uneven_routing(report: dict) -> dict:
    b, experts = report["balance"], report["experts"]
    sparse = report["dead"] > 0.01 * experts
    if sparse:
        verdict = "no"
    elif b["top_ratio"]["lo"] >= 2 and b["gini"]["lo"] >= 0.25:
        verdict = "yes"
    else:
        verdict = "partly" if b["top_ratio"]["lo"] >= 1.5 or b["gini"]["lo"] >= 0.15 else "no"

    def figure(key: str, fmt: str) -> str:
        return span(b[key]["mean"], (b[key]["lo"], b[key]["hi"]), fmt)

    return row(
        "Routing is uneven but not sparse: almost every expert is used, some far more than others.",
        "entropy ratio 0.91, Gini 0.53, busiest 10 % of experts 5.2x their fair share",
        "Means over layers, 95 % bootstrap intervals over calibration prompts. Not sparse: at most 1 % of experts "
        "never chosen. yes: not sparse, and the whole interval of the busiest 10 %'s share is at least 2x fair and "
        "of the Gini at least 0.25; partly: not sparse, and one of them clears 1.5x or 0.15; no: otherwise.",
        f"{report['dead']} of {experts} never chosen; entropy ratio {figure('entropy_ratio', '{:.3f}')}, Gini "
        f"{figure('gini', '{:.2f}')}, busiest 10 % {figure('top_ratio', '{:.2f}x')} their fair share",
        verdict)


def frequency_proxy(prune: dict) -> dict:
    criteria, ratio = prune["criteria"], prune["ratio_compared"]
    others = [c for c in criteria if c != "frequency"]
    rows = ["none", *(f"{c}@{ratio:g}" for c in criteria)]
    point, samples = plan_losses(prune["windows"], rows)
    index = {c: i + 1 for i, c in enumerate(criteria)}
    parts, better, worse = [], 0, 0
    for c in criteria:
        text = f"{c} {span(*change(point, samples, index[c], 0))}"
        if c != "frequency":
            value, ci = change(point, samples, index[c], index["frequency"])
            better, worse = better + (ci[1] < 0), worse + (ci[0] > 0)
            text += f" (vs frequency {span(value, ci)})"
        parts.append(text)
    verdict = "yes" if others and better == len(others) else "partly" if better and not worse else "no"
    return row(
        "Activation frequency is a poor proxy for importance when pruning.",
        "a direction, no figure: importance-aware criteria (gate mass, REAP saliency) prune better",
        "Every criterion removes the same share of experts (the sweep's middle ratio, structurally); perplexity "
        "change against the unpruned model and against frequency, paired 95 % bootstrap over the held-out windows; "
        "all criteria at once, none picked afterwards. yes: every other criterion beats frequency (interval of the "
        "difference below 0); partly: some do and none is worse; no: otherwise.",
        f"{ratio:.0%} of experts removed: " + "; ".join(parts),
        verdict, "" if others else "only frequency was swept: nothing to compare")


def is_english(group: str) -> bool:
    return group.split("/")[-1].lower().split("-")[0] == "en"


def english_bias(prune: dict) -> dict:
    ratio, windows = prune["bad_ratio"], prune["windows"]
    rows = [f"frequency@{ratio:g}", f"english-frequency@{ratio:g}"]
    groups = sorted(windows[rows[0]])
    other, english = [g for g in groups if not is_english(g)], [g for g in groups if is_english(g)]
    value, ci = change(*plan_losses(windows, rows, other), 1, 0)
    text = f"other languages {span(value, ci)}"
    note, clear_of_english = "", None
    if english:
        base_value, base_ci = change(*plan_losses(windows, rows, english, seed=1), 1, 0)
        clear_of_english = ci[0] > base_ci[1]
        text += f", English {span(base_value, base_ci)}"
    else:
        note = "no English evaluation group: the bias cannot be told from a general loss"
    text += f"; worst group {prune['english_worst_group']} x{prune['english_worst_ratio']:.2f}"
    if ci[0] > 0.05 and clear_of_english:
        verdict = "yes"
    else:
        verdict = "partly" if ci[0] > 0 else "no"
    return row(
        "English-only calibration biases pruning against other languages and domains.",
        "a direction, no figure",
        "Frequency pruning at the demo's bad-model ratio from an English-only profile against the same from the "
        "full profile: perplexity change on the non-English held-out groups and on the English ones, 95 % bootstrap "
        "over windows. yes: non-English groups at least 5 % worse (whole interval) and their interval clear above "
        "the English groups'; partly: non-English groups worse, but less or not more than English; no: not worse.",
        f"{ratio:.0%} removed, English-only vs full calibration: {text}",
        verdict, note)


def tiers_versus_pruning(prune: dict, quant: dict) -> dict:
    smallest, tiered = prune["smallest_ratio"], quant["plans"]["tiered"]
    windows = {**prune["windows"], "tiered": quant["windows"]["tiered"]}
    point, samples = plan_losses(windows, ["none", "tiered", f"frequency@{smallest:g}"])
    (t, t_ci), (p, p_ci) = change(point, samples, 1, 0), change(point, samples, 2, 0)
    degenerate = len(tiered["widths"]) == 1
    note = (f"every expert landed in one tier: the tiered plan is uniform {tiered['widths'][0]}-bit, so this "
            "compares uniform bits with pruning, not tiers") if degenerate else ""
    clear = t_ci[1] < p_ci[0]
    verdict = "no" if not clear else "partly" if degenerate else "yes"
    return row(
        "Tiered precision (8/4/2 bits) costs far less than pruning.",
        "+0.5 % perplexity (tiers) vs +1,220 % (5 % of experts pruned)",
        "The default tier plan (critical 8, standard 4, deprioritised 2 bits) against removing the sweep's smallest "
        "share of experts by frequency; perplexity change vs the original, 95 % bootstrap over held-out windows. "
        "yes: the tiered plan's whole interval below pruning's, with at least two widths in use; partly: the same "
        "with one width (a uniform plan); no: the intervals overlap or tiers cost more.",
        f"tiered at {tiered['average_bits']:.2f} average bits ({'/'.join(map(str, tiered['widths']))}): "
        f"{span(t, t_ci)}; {smallest:.0%} of experts removed by frequency: {span(p, p_ci)}",
        verdict, note)


def row_1e9(prune: dict) -> dict:
    r = prune["replay"]
    row_share, remove = r["row_1e9"]["share"], r["remove"]
    controls = r["mask"]["pruned"] == 0 and remove["max_share"] <= remove["tolerance"]
    note = "" if remove["exact"] else ("this router family does not make removal equal to a mask: the removal "
                                       "comparison is shown but watches nothing")
    verdict = "no" if row_share < 0.01 else "yes" if controls and remove["exact"] else "partly"
    return row(
        "Setting a router row to -1e9 does not prune an expert.",
        "40-53 % of tokens still chose the 'pruned' expert (design notes)",
        "Replay of calibration prompts through the -1e9 checkpoint, the run-time -inf mask and the removed "
        "checkpoint (exact counts over the replayed tokens). yes: -1e9 leaves at least 1 % of the selections on "
        "the 'pruned' experts, the mask none, and the removed model's routers choose as the original ones under "
        "the mask (float32, same inputs; at most 0.1 % of tokens differ in any layer); partly: -1e9 leaks but a "
        "control fails or cannot be checked; no: -1e9 leaves less than 1 %.",
        f"-1e9: {r['row_1e9']['pruned']} of {r['row_1e9']['selections']} selections ({row_share:.1%}) still went "
        f"to the 'pruned' experts; run-time mask: {r['mask']['pruned']} of {r['mask']['selections']}; removed vs "
        f"masked routers: {remove['max_share']:.2%} of tokens routed differently (worst layer)",
        verdict, note)


def findings(stages: dict) -> list[dict]:
    """The seeds' claims, then those of the merge and MLX stages (when they ran), each judged by its stated
    rule on this run's measurements."""
    report, prune, quant = stages["report"], stages["prune"], stages["quantize"]
    return [sample_size(report), uneven_routing(report), frequency_proxy(prune), english_bias(prune),
            tiers_versus_pruning(prune, quant), row_1e9(prune)] + merge_findings(stages.get("merge")) + \
        mlx_findings(stages.get("mlx"))
