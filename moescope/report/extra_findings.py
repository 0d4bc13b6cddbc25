"""Findings beyond the seeds' six claims, judged the same way (moescope.report.verdicts): merging against
removal and what router repair recovers (the merge stage), and whether MLX serves what torch measured
(the MLX stage). Each function takes its stage's results only, or None when the stage did not run."""

from __future__ import annotations

import math

import numpy as np

from moescope.analysis.uncertainty import percentile_interval
from moescope.report.charts import REPAIRED
from moescope.report.verdicts import change, plan_losses, row, span


def merge_variants(variants) -> list[str]:
    """The merge variants among a sweep point's variant names, as written (no repair)."""
    return [v for v in variants if v.startswith("merge ") and not v.endswith(REPAIRED)]


def merging(merge: dict) -> dict:
    removal, parts, better, worse, compared = f"remove {merge['criterion']}", [], 0, 0, 0
    for ratio, point in merge["points"].items():
        merges = merge_variants(point["variants"])
        names = ["none", removal, *merges]
        estimate, samples = plan_losses(merge["windows"], [f"{n}@{ratio}" if n != "none" else n for n in names])
        text = [f"removal {span(*change(estimate, samples, 1, 0))}"]
        for i, name in enumerate(merges, 2):
            value, ci = change(estimate, samples, i, 1)
            better, worse, compared = better + (ci[1] < 0), worse + (ci[0] > 0), compared + 1
            text.append(f"{name.removeprefix('merge ')} {span(*change(estimate, samples, i, 0))} "
                        f"(vs removal {span(value, ci)})")
        parts.append(f"{float(ratio):.0%} fewer: " + ", ".join(text))
    verdict = "yes" if compared and better == compared else "partly" if better and not worse else "no"
    return row(
        "Merging experts loses less quality than removing them at the same expert count.",
        "HC-SMoE, M-SMoE, REAM: merging keeps more (REAM: >= 98 % of Qwen3.5-122B-A10B's scores from 256 to 192 "
        "experts); REAP argues the opposite: merging collapses the router's control",
        f"Each merge method against removal by {merge['criterion']} (chosen before the run) at the same number of "
        "experts fewer per layer, both as written, no repair; perplexity change, paired 95 % bootstrap over the "
        "held-out windows. yes: every merge method beats removal (interval of the difference below 0) at every "
        "ratio; partly: some do somewhere and none is worse anywhere; no: otherwise.",
        "; ".join(parts), verdict)


def recovered_share(estimate: np.ndarray, samples: np.ndarray, written: int, repaired: int) -> tuple[float, list]:
    """1 - (perplexity change after repair) / (change as written), with its 95 % interval."""
    def share(none, plain, fixed):
        return 1 - np.expm1(fixed - none) / np.expm1(plain - none)

    point = float(share(estimate[0], estimate[written], estimate[repaired]))
    return point, percentile_interval(share(samples[:, 0], samples[:, written], samples[:, repaired]))


def router_repair(merge: dict) -> dict:
    parts, shares, lows, skipped = [], [], [], []
    for ratio, point in merge["points"].items():
        variants = [f"remove {merge['criterion']}", *merge_variants(point["variants"])]
        names = ["none", *(f"{v}@{ratio}" for v in variants), *(f"{v}{REPAIRED}@{ratio}" for v in variants)]
        estimate, samples = plan_losses(merge["windows"], names)
        for i, variant in enumerate(variants, 1):
            if estimate[i] <= estimate[0]:
                skipped.append(f"{variant} at {float(ratio):.0%}")
                continue
            share, ci = recovered_share(estimate, samples, i, i + len(variants))
            shares.append(share)
            lows.append(ci[0])
            parts.append(f"{variant} at {float(ratio):.0%} fewer: {span(share, ci, '{:.0%}')}")
    mean = float(np.mean(shares)) if shares else math.nan
    if shares and min(lows) > 0 and mean >= 0.25:
        verdict = "yes"
    else:
        verdict = "partly" if shares and min(shares) > 0 else "no"
    return row(
        "Refitting only the router recovers much of the loss after pruning or merging.",
        "Most of the loss after pruning comes from the router no longer matching the remaining experts; "
        "refitting the router alone recovers much of it (2026 study)",
        "Share of the perplexity change that router repair takes back, 1 - (change after repair) / (change as "
        "written), for removal and each merge method at each ratio; 95 % bootstrap over the held-out windows. "
        "yes: every interval above 0 and the mean share at least 25 %; partly: every share above 0, but less; "
        "no: some repair loses ground.",
        f"recovered: {'; '.join(parts)} (mean {mean:.0%})",
        verdict, f"nothing to recover (no loss as written): {', '.join(skipped)}" if skipped else "")


def merge_findings(merge: dict | None) -> list[dict]:
    """Removal against merging at equal expert counts, and what router repair recovers (the merge stage)."""
    return [merging(merge), router_repair(merge)] if merge else []


def mlx_findings(run: dict | None) -> list[dict]:
    """The row of the demo's MLX stage (none when the moescope[mlx] extra is not installed)."""
    if not run:
        return []
    mb = 1e6
    same_routing = run["selections_differing"] == 0
    as_predicted = abs(run["served_perplexity"] / run["predicted_perplexity"] - 1) < 1e-3
    verdict = "yes" if same_routing and as_predicted else "partly" if same_routing or as_predicted else "no"
    return [row(
        "What is measured in torch is what MLX serves.",
        "the seeds profiled and compressed their MoE under MLX",
        "The model profiled under mlx-lm in float32 against the torch profile of the same prompts, and its tiered "
        "plan really quantised by mlx-lm against torch's fake-quantised prediction of the same plan (MLX's "
        "scales). yes: not one expert selection differs and the served perplexity is within 0.1 % of the "
        "prediction; partly: one of the two; no: neither.",
        f"MLX profile: {run['selections_differing']} of {run['selections']} selections differ from torch's; tiered "
        f"plan served by mlx-lm at {run['served_bits']:.2f} bits per expert weight (planned "
        f"{run['tiered_bits']:.2f}), {run['disk_bytes'] / mb:.2f} MB on disk (experts "
        f"{run['expert_disk_bytes'] / mb:.2f} MB, arithmetic {run['expert_planned_bytes'] / mb:.2f} MB): "
        f"{run['served_loss']:+.2%} perplexity vs the original, torch predicted {run['predicted_loss']:+.2%}",
        verdict)]
