"""How evenly a layer spreads its selections over its experts: entropy ratio, Gini, top-n share.

Array functions reduce over the last axis (experts), so they apply to one layer or to a stack of
layers or bootstrap resamples alike. Formulas and reasons: docs/metrics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moescope.analysis.uncertainty import basic_interval, resample_weights
from moescope.profiling.store import HIST_EDGES


def shares(counts: np.ndarray) -> np.ndarray:
    """counts / their sum over the last axis (0 where the sum is 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats over the last axis of (already normalised) distributions."""
    p = np.asarray(p, dtype=np.float64)
    return -(p * np.log(p, where=p > 0, out=np.zeros_like(p))).sum(-1)


def entropy_ratio(counts: np.ndarray) -> np.ndarray:
    """H / ln E of the selection distribution: 1 = perfectly even, 0 = one expert takes everything."""
    experts = np.shape(counts)[-1]
    return entropy(shares(counts)) / math.log(experts) if experts > 1 else np.ones(np.shape(counts)[:-1])


def gini(counts: np.ndarray) -> np.ndarray:
    """Gini coefficient over the last axis: 0 = even, (E-1)/E = one expert takes everything."""
    x = np.sort(np.asarray(counts, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    total = x.sum(-1)
    rank_sum = (x * np.arange(1, n + 1)).sum(-1)
    return np.divide(2 * rank_sum, n * total, out=np.full(total.shape, (n + 1) / n), where=total > 0) - (n + 1) / n


def top_share(counts: np.ndarray, n: int) -> np.ndarray:
    """Share of the selections taken by the n most used experts (the fair share of n experts is n/E)."""
    p = shares(counts)
    return np.partition(p, p.shape[-1] - n, axis=-1)[..., p.shape[-1] - n:].sum(-1)  # partition: no full sort


def hist_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """Quantile q of values histogrammed over HIST_EDGES (last axis = bins), log-interpolated in a bin.

    Bin 0 is [0, 1e-6) (linear), bins 1..64 are [edge i-1, edge i) (geometric), the last bin [1e2, inf)
    reports 1e2. NaN where the histogram is empty.
    """
    hist = np.asarray(hist, dtype=np.float64)
    cum = hist.cumsum(-1)
    target = q * cum[..., -1]
    k = np.minimum((cum < target[..., None]).sum(-1), hist.shape[-1] - 1)
    before = np.take_along_axis(cum - hist, k[..., None], -1)[..., 0]
    inside = np.take_along_axis(hist, k[..., None], -1)[..., 0]
    f = np.clip(np.divide(target - before, inside, out=np.zeros_like(target), where=inside > 0), 0, 1)
    lower = np.concatenate([[0.0], HIST_EDGES])[k]
    upper = np.concatenate([HIST_EDGES, [HIST_EDGES[-1]]])[k]
    value = np.where(k == 0, upper * f, lower * (upper / np.where(lower > 0, lower, 1)) ** f)
    return np.where(cum[..., -1] > 0, value, np.nan)


def top_count(experts: int, fraction: float) -> int:
    """n of the top-n share: `fraction` of a layer's experts, at least 1."""
    return max(1, round(fraction * experts))


BALANCE_RANGE = {"entropy_ratio": (0, 1), "gini": (0, 1), "top_share": (0, 1), "top_ratio": (1, np.inf)}


def balance(counts: np.ndarray, num_experts: np.ndarray, top_fraction: float) -> dict[str, np.ndarray]:
    """Entropy ratio, Gini, top-n share and its ratio to the fair share n/E of selection counts
    [..., L, E] -> [..., L], each layer over its own `num_experts` slots (the rest is padding)."""
    out = {key: np.empty(np.shape(counts)[:-1]) for key in BALANCE_RANGE}
    for e in np.unique(num_experts):
        rows = num_experts == e
        c, n = counts[..., rows, :e], top_count(e, top_fraction)
        out["entropy_ratio"][..., rows] = entropy_ratio(c)
        out["gini"][..., rows] = gini(c)
        out["top_share"][..., rows] = top_share(c, n)
        out["top_ratio"][..., rows] = out["top_share"][..., rows] * e / n
    return out


def bootstrap_balance(prompt_counts: np.ndarray, num_experts: np.ndarray, top_fraction: float, resamples: int,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Bootstrap samples [R, L] of `balance` from per-prompt selection counts [N, L, E]: resample the
    prompts with replacement, add up their counts (one matrix product), recompute. Layers go in
    blocks small enough that a block's counts as float64 stay near 64 MB."""
    n, layers, width = prompt_counts.shape
    weights = resample_weights(n, resamples, rng).astype(np.float64)
    samples = {key: np.empty((resamples, layers)) for key in BALANCE_RANGE}
    step = max(1, 2**23 // (max(n, resamples) * width))
    for start in range(0, layers, step):
        block = slice(start, start + step)
        counts = np.tensordot(weights, prompt_counts[:, block].astype(np.float64), axes=1)  # [R, layers, E]
        for key, values in balance(counts, num_experts[block], top_fraction).items():
            samples[key][:, block] = values
    return samples


@dataclass
class BalanceIntervals:
    """The balance metrics of each layer, with 95 % basic bootstrap intervals over prompts."""

    point: dict[str, np.ndarray]  # metric -> [L]
    ci: dict[str, np.ndarray]  # metric -> [2, L]; NaN without per-prompt counts
    mean_ci: dict[str, np.ndarray]  # entropy ratio, Gini, top ratio -> [2] interval of the layer mean


def balance_intervals(counts: np.ndarray, prompt_counts: np.ndarray | None, num_experts: np.ndarray,
                      top_fraction: float, resamples: int, rng: np.random.Generator) -> BalanceIntervals:
    """`balance` of selection counts [L, E], and its intervals when per-prompt counts [N, L, E] exist (N >= 2)."""
    point = balance(counts, num_experts, top_fraction)
    ci = dict.fromkeys(BALANCE_RANGE, np.full((2, len(num_experts)), np.nan))
    mean_ci = {}
    if prompt_counts is not None and len(prompt_counts) >= 2:
        samples = bootstrap_balance(prompt_counts, num_experts, top_fraction, resamples, rng)
        ci = {key: basic_interval(point[key], samples[key], *BALANCE_RANGE[key]) for key in samples}
        mean_ci = {key: basic_interval(point[key].mean(), samples[key].mean(1), *BALANCE_RANGE[key])
                   for key in ("entropy_ratio", "gini", "top_ratio")}
    return BalanceIntervals(point, ci, mean_ci)
