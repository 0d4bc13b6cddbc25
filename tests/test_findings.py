"""The demo's findings judged on planted stage results: each verdict reads yes, partly or no by its stated
rule, whatever model produced the numbers, and the pages say when a comparison cannot tell."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from moescope.report.findings import (
    english_bias,
    findings,
    frequency_proxy,
    row_1e9,
    sample_size,
    tiers_versus_pruning,
    uneven_routing,
)
from moescope.report.findings_page import findings_markdown, index_html, markdown_structure, quant_rows

GROUPS = ("general/en", "code/en", "multilingual/fr", "multilingual/ja")
WINDOWS = 8


def planted_windows(shifts: dict[str, float | dict[str, float]], seed: int = 0) -> dict:
    """Per-window mean NLLs: a baseline ("none") and plans whose NLL is the baseline's plus a planted shift
    (one for all groups, or one per group) plus a little window noise; exp(shift) - 1 is the planted loss."""
    rng = np.random.default_rng(seed)
    base = {g: rng.normal(3.0, 0.3, WINDOWS) for g in GROUPS}
    out = {"none": {g: v.tolist() for g, v in base.items()}}
    for plan, shift in shifts.items():
        per_group = shift if isinstance(shift, dict) else dict.fromkeys(GROUPS, shift)
        out[plan] = {g: (base[g] + per_group[g] + rng.normal(0, 0.005, WINDOWS)).tolist() for g in GROUPS}
    return out


def report(dead_at=(9.6, 0.02, 0.0), balance=None, dead: int = 0) -> dict:
    balance = balance or {"entropy_ratio": (0.99, 0.98, 1.0), "gini": (0.12, 0.09, 0.13),
                          "top_ratio": (1.38, 1.14, 1.4)}
    return {"experts": 128, "prompts": 218, "dead": dead, "prompts_needed": 5,
            "dead_at": {key: {"n": n, "mean": v, "lo": v * 0.8, "hi": v * 1.2}
                        for key, n, v in zip(("1", "5", "all"), (1, 5, 218), dead_at)},
            "balance": {key: dict(zip(("mean", "lo", "hi"), values)) for key, values in balance.items()}}


def replay(row_share: float = 0.5, mask: int = 0, remove: float = 0.0, exact: bool = True) -> dict:
    selections = 10000
    return {"row_1e9": {"pruned": int(row_share * selections), "selections": selections, "share": row_share},
            "mask": {"pruned": mask, "selections": selections, "share": mask / selections},
            "remove": {"max_share": remove, "exact": exact, "tolerance": 0.001, "by_layer": {"0": remove}}}


def prune(shifts: dict, criteria=("frequency", "gate-mass", "saliency"), **replay_args) -> dict:
    return {"criteria": list(criteria), "ratio_compared": 0.1, "smallest_ratio": 0.05, "bad_ratio": 0.25,
            "windows": planted_windows(shifts), "english_worst_group": "multilingual/ja", "english_worst_ratio": 1.3,
            "replay": replay(**replay_args)}


def quant(tiered_shift: float = 0.01, widths=(2, 4, 8)) -> dict:
    plans = {"uniform-4": [4], "uniform-3": [3], "tiered": list(widths), "budget-3": [2, 3, 4]}
    return {"plans": {name: {"average_bits": 4.0, "widths": w, "loss": 0.0, "perplexity": 20.0,
                             "bits_hash": "u4" if name == "tiered" and list(widths) == [4] else name}
                      for name, w in plans.items()},
            "windows": planted_windows({"uniform-4": 0.01, "uniform-3": 0.05, "tiered": tiered_shift,
                                        "budget-3": 0.05}),
            "allocation": "importance gate-energy from the full profile x squared weight error"}


@pytest.mark.parametrize("dead_at, verdict", [((60, 38.4, 0.8), "yes"),  # the seeds: 30 % after 5, 0.6 % at 100
                                              ((9.6, 0.02, 0.0), "partly"),  # falls, but not by 5 prompts
                                              ((0.9, 0.5, 0.2), "no")])  # hardly falls at all
def test_sample_size_verdict(dead_at, verdict):
    assert sample_size(report(dead_at=dead_at))["verdict"] == verdict


def test_sample_size_shows_twenty_prompts_and_the_unseen_check_when_recorded():
    planted = report()
    planted["dead_at"]["20"] = {"n": 20, "mean": 6.4, "lo": 3.2, "hi": 9.6}
    planted["unseen_check"] = {"prompts_used": 109, "splits": 20, "predicted_total": 1.25, "actual_total": 2.5}
    measured = sample_size(planted)["measured"]
    assert "5.0% [2.5%, 7.5%] after 20" in measured
    assert "from 109 prompts the unseen-expert estimate expects 1.2 more" in measured and "reveals 2.5" in measured
    assert "after 20" not in sample_size(report())["measured"]


@pytest.mark.parametrize("balance, dead, verdict", [
    ({"entropy_ratio": (0.91, 0.9, 0.92), "gini": (0.53, 0.5, 0.56), "top_ratio": (5.2, 4.8, 5.6)}, 0, "yes"),
    ({"entropy_ratio": (0.97, 0.96, 0.98), "gini": (0.2, 0.18, 0.22), "top_ratio": (1.7, 1.6, 1.8)}, 1, "partly"),
    (None, 0, "no"),  # the shipped demo model: layer means 0.993 / 0.12 / 1.38x
    ({"entropy_ratio": (0.91, 0.9, 0.92), "gini": (0.53, 0.5, 0.56), "top_ratio": (5.2, 4.8, 5.6)}, 20, "no"),
])
def test_uneven_routing_verdict(balance, dead, verdict):
    """Uneven enough by the stated thresholds, and sparse (20 of 128 dead) is a "no" however uneven."""
    assert uneven_routing(report(balance=balance, dead=dead))["verdict"] == verdict


@pytest.mark.parametrize("shifts, verdict", [
    ({"frequency@0.1": 0.2, "gate-mass@0.1": 0.1, "saliency@0.1": 0.05}, "yes"),
    ({"frequency@0.1": 0.2, "gate-mass@0.1": 0.2, "saliency@0.1": 0.05}, "partly"),
    ({"frequency@0.1": 0.15, "gate-mass@0.1": 0.154, "saliency@0.1": 0.04}, "no"),  # the review: gate mass worse
    ({"frequency@0.1": 0.1, "gate-mass@0.1": 0.1, "saliency@0.1": 0.1}, "no"),
])
def test_frequency_proxy_compares_every_criterion_at_once(shifts, verdict):
    row = frequency_proxy(prune(shifts))
    assert row["verdict"] == verdict
    assert all(c in row["measured"] for c in ("frequency", "gate-mass", "saliency"))


def test_frequency_alone_has_nothing_to_compare():
    row = frequency_proxy(prune({"frequency@0.1": 0.2}, criteria=("frequency",)))
    assert row["verdict"] == "no" and "nothing to compare" in row["note"]


def bias_shifts(other: float, english: float) -> dict:
    return {"frequency@0.25": 0.1, "english-frequency@0.25": {
        g: 0.1 + (english if g.endswith("/en") else other) for g in GROUPS}}


@pytest.mark.parametrize("other, english, verdict", [(0.3, 0.0, "yes"), (0.3, 0.3, "partly"), (0.0, 0.0, "no"),
                                                      (-0.1, 0.2, "no")])
def test_english_bias_verdict(other, english, verdict):
    assert english_bias(prune(bias_shifts(other, english)))["verdict"] == verdict


@pytest.mark.parametrize("tiered, widths, verdict", [(0.01, (2, 4, 8), "yes"), (0.01, (4,), "partly"),
                                                     (0.2, (2, 4, 8), "no")])
def test_tiers_versus_pruning_says_when_tiers_are_uniform(tiered, widths, verdict):
    row = tiers_versus_pruning(prune({"frequency@0.05": 0.2}), quant(tiered, widths))
    assert row["verdict"] == verdict
    assert ("uniform 4-bit" in row["note"]) == (widths == (4,))


@pytest.mark.parametrize("args, verdict, note", [({}, "yes", False), ({"exact": False}, "partly", True),
                                                 ({"mask": 3}, "partly", False), ({"remove": 0.02}, "partly", False),
                                                 ({"row_share": 0.001}, "no", False)])
def test_row_1e9_verdict_and_controls(args, verdict, note):
    row = row_1e9({"replay": replay(**args)})
    assert row["verdict"] == verdict and bool(row["note"]) == note


def test_losses_come_back_from_planted_shifts():
    """The planted loss exp(shift) - 1 lies in each reported interval, and the intervals are narrow (the
    window noise is small)."""
    row = tiers_versus_pruning(prune({"frequency@0.05": 0.2}), quant(0.01))
    figures = re.findall(r"([+-][\d.]+)% \[([+-][\d.]+)%, ([+-][\d.]+)%\]", row["measured"])
    assert len(figures) == 2
    for (point, lo, hi), shift in zip(figures, (0.01, 0.2), strict=True):
        assert float(lo) <= 100 * math.expm1(shift) <= float(hi) and float(hi) - float(lo) < 1
        assert float(lo) <= float(point) <= float(hi)


def test_identical_plans_are_named_and_pages_show_every_verdict():
    stages = {"settings": {"generate": 8, "seq_len": 256, "sequences": 16, "ratios": [0.05, 0.1, 0.25]},
              "torch_threads": 1, "report": report(),
              "prune": prune({"frequency@0.1": 0.2, "gate-mass@0.1": 0.2, "saliency@0.1": 0.05,
                              "frequency@0.05": 0.1, **bias_shifts(0.3, 0.0)}),
              "quantize": quant(0.01, (4,)),
              "gate": {"recommended": {"verdict": "warn", "prompts_by_verdict": {"pass": 3, "warn": 1, "fail": 0}}}}
    stages["quantize"]["plans"]["uniform-4"]["bits_hash"] = "u4"
    data = {"findings": findings(stages), "stages": stages}
    assert [r["verdict"] for r in data["findings"]] == ["partly", "no", "partly", "yes", "partly", "yes"]
    assert {r["plan"]: r["same_as"] for r in quant_rows(stages["quantize"])}["tiered"] == "uniform-4"
    page = index_html(data)
    assert all(f"<td class='{v}'><b>{v}</b>" in page for v in ("yes", "partly", "no"))
    assert "the tiered plan is uniform 4-bit" in page
    text = findings_markdown(data)
    structure = markdown_structure(text)
    assert structure[0] == "# Findings on the embedded demo model"
    assert [s for s in structure if isinstance(s, tuple)][1:] == [(r["claim"], r["rule"]) for r in data["findings"]]
    assert "uniform-4" in structure and "| tiered | 4.00 | 4 |" in text
