"""The machinery every demo finding is judged with: a stated rule, a verdict of "yes", "partly" or "no",
and 95 % intervals from a paired bootstrap over the held-out windows (`plan_losses`, `change`)."""

from __future__ import annotations

import math

import numpy as np

from moescope.analysis.uncertainty import grouped_bootstrap, percentile_interval

RESAMPLES = 2000
FINDING_VERDICTS = ("yes", "partly", "no")


def span(point: float, interval, fmt: str = "{:+.1%}") -> str:
    """"+4.2 % [+1.0 %, +7.9 %]"-style text of a figure and its 95 % interval."""
    return f"{fmt.format(point)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def plan_losses(windows: dict[str, dict[str, list[float]]], rows: list[str], groups: list[str] | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(point [P], samples [R, P]) of the mean per-token NLL (mean over groups of the mean over windows)
    of the plans `rows`, paired over the evaluation windows of `groups` (default: all groups)."""
    groups = groups if groups is not None else sorted(windows[rows[0]])
    values = [np.array([windows[row][group] for row in rows], dtype=np.float64) for group in groups]
    return grouped_bootstrap(values, RESAMPLES, np.random.default_rng(seed))


def change(point: np.ndarray, samples: np.ndarray, a: int, b: int) -> tuple[float, np.ndarray]:
    """Plan a's perplexity over plan b's, minus 1 (geometric mean over groups), with its 95 % interval."""
    return math.expm1(point[a] - point[b]), percentile_interval(np.expm1(samples[:, a] - samples[:, b]))


def row(claim: str, seeds: str, rule: str, measured: str, verdict: str, note: str = "") -> dict:
    return {"claim": claim, "seeds": seeds, "rule": rule, "measured": measured, "verdict": verdict, "note": note}
