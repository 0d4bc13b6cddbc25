"""How sure a profile's figures are: bootstrap intervals over prompts, and the experts not yet seen.

Per-prompt selection counts give bootstrap intervals over prompts for the balance metrics. Presence
(which experts each prompt touched) gives the sample-size curve and the unseen-expert estimate
(Chao2, the incidence form of Chao1), computed on incidence counts, i.e. how many prompts touched
each expert, and from it the experts truly unused (dead minus unseen; the dead count itself is not
bootstrapped). Formulas and reasons: docs/metrics.md.
"""

from __future__ import annotations

import numpy as np

from moescope.profiling.store import Profile


def presence_matrix(profile: Profile) -> np.ndarray:
    """bool [N, L, E]: experts each prompt touched in each layer, in any phase."""
    packed = np.bitwise_or.reduce(profile.counters["presence"], axis=1)  # OR the phases while still packed
    return np.unpackbits(packed, axis=-1, bitorder="little")[..., : profile.num_experts].astype(bool)


def chao2(incidence: np.ndarray, prompts: int, cap: np.ndarray | int | None = None) -> np.ndarray:
    """Estimated experts used but not yet seen (Chao2 Q0) from incidence counts [..., E] over `prompts`.

    Q0 = (m-1)/m * Q1^2 / (2 Q2), or (m-1)/m * Q1 (Q1-1) / 2 when Q2 = 0, where Qj is the number of
    experts touched by exactly j prompts. `cap` (the experts not yet seen) bounds it.
    """
    q1 = (incidence == 1).sum(-1).astype(np.float64)
    q2 = (incidence == 2).sum(-1).astype(np.float64)
    m = max(prompts, 1)
    q0 = (m - 1) / m * np.where(q2 > 0, q1**2 / (2 * np.maximum(q2, 1)), q1 * np.maximum(q1 - 1, 0) / 2)
    return q0 if cap is None else np.minimum(q0, cap)


def extrapolate(incidence: np.ndarray, prompts: int, more: float, q0: np.ndarray) -> np.ndarray:
    """Experts expected to be seen after `more` additional prompts (Chao et al. 2014, incidence form):
    S_obs + Q0 [1 - (1 - Q1 / (m Q0 + Q1))^more]."""
    seen = (incidence > 0).sum(-1)
    q1 = (incidence == 1).sum(-1)
    step = np.divide(q1, prompts * q0 + q1, out=np.zeros(np.shape(q0)), where=prompts * q0 + q1 > 0)
    return seen + q0 * (1 - (1 - step) ** more)


def prompts_needed(incidence: np.ndarray, prompts: int, q0: np.ndarray, coverage: float) -> np.ndarray:
    """Prompts expected to reveal `coverage` of the estimated live experts (S_obs + Q0). Beyond the
    sample: the extrapolation above solved for the number of additional prompts. Within it (the
    sample already reveals that much): the smallest n whose mean over prompt orderings (the exact
    rarefaction, at the `curve_points`) does, so a sample far larger than needed says so."""
    seen = (incidence > 0).sum(-1)
    q1 = (incidence == 1).sum(-1)
    missing = coverage * (seen + q0) - seen
    step = np.divide(q1, prompts * q0 + q1, out=np.zeros(np.shape(q0)), where=prompts * q0 + q1 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        more = np.log(1 - missing / q0) / np.log(1 - step)
    points = curve_points(prompts)
    expected = seen[..., None] - rarefaction(np.where(incidence > 0, incidence, -1), prompts, points)
    within = points[np.argmax(expected >= (coverage * (seen + q0))[..., None] - 1e-9, axis=-1)]
    return np.where(missing > 0, prompts + np.ceil(np.nan_to_num(more, nan=0.0, posinf=0.0)), within)


def chao2_variance(incidence: np.ndarray, prompts: int, q0: np.ndarray) -> np.ndarray:
    """Variance of the Chao2 Q0 (Chao 1987, incidence form; the Q2 = 0 case as in EstimateS)."""
    q1 = (incidence == 1).sum(-1).astype(np.float64)
    q2 = (incidence == 2).sum(-1).astype(np.float64)
    a = (max(prompts, 1) - 1) / max(prompts, 1)
    r = q1 / np.maximum(q2, 1)
    no_q2 = (a * q1 * (q1 - 1) / 2 + a**2 * q1 * (2 * q1 - 1) ** 2 / 4
             - a**2 * q1**4 / (4 * np.maximum((incidence > 0).sum(-1) + q0, 1)))
    return np.maximum(np.where(q2 > 0, q2 * (a / 2 * r**2 + a**2 * r**3 + a**2 / 4 * r**4), no_q2), 0)


def lognormal_interval(q0: np.ndarray, var: np.ndarray) -> np.ndarray:
    """[2, ...] 95 % interval [Q0 / K, Q0 K], K = exp(1.96 sqrt(ln(1 + var / Q0^2))) (Chao 1987)."""
    q0 = np.asarray(q0, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(q0 > 0, np.exp(1.96 * np.sqrt(np.log1p(var / q0**2))), 1.0)
    return np.stack([q0 / k, q0 * k])


def percentile_interval(samples: np.ndarray) -> np.ndarray:
    """[2, ...] 95 % percentile interval of samples along the first axis."""
    return np.percentile(samples, [2.5, 97.5], axis=0)


def resample_weights(prompts: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """int [R, N]: how often each of N prompts is drawn in each of R bootstrap resamples (N draws with
    replacement). A statistic of summed per-prompt values is then one matrix product per resample set."""
    index = rng.integers(0, prompts, size=(resamples, prompts)) + prompts * np.arange(resamples)[:, None]
    return np.bincount(index.ravel(), minlength=resamples * prompts).reshape(resamples, prompts)


def bootstrap_mean(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[2, ...] 95 % percentile bootstrap interval of the mean over the first axis (prompts)."""
    weights = resample_weights(len(values), resamples, rng)
    means = weights @ np.reshape(values, (len(values), -1)) / len(values)
    return percentile_interval(means.reshape(resamples, *np.shape(values)[1:]))


def grouped_bootstrap(groups: list[np.ndarray], resamples: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(point [P], samples [R, P]): the mean over groups of each group's mean over its windows, for values
    [P, W_g] per group. P rows are paired (e.g. a baseline and candidates scored on the same evaluation
    windows): each resample draws every group's windows with replacement, one draw for all rows, so a
    difference between rows keeps only the uncertainty of the difference."""
    point = np.mean([g.mean(1) for g in groups], axis=0)
    samples = np.mean([resample_weights(g.shape[1], resamples, rng) @ g.T / g.shape[1] for g in groups], axis=0)
    return point, samples


def basic_interval(point: np.ndarray, samples: np.ndarray, low: float = -np.inf,
                   high: float = np.inf) -> np.ndarray:
    """[2, ...] 95 % basic (reverse percentile) bootstrap interval [2 t - q97.5, 2 t - q2.5] of the
    estimate t, clipped to [low, high]. Plug-in statistics of pooled counts (entropy, Gini) are
    biased, and the resamples carry the same bias again; reflecting the percentiles about t removes
    it where the plain percentile interval doubles it (docs/metrics.md: coverage)."""
    lo, hi = percentile_interval(samples)
    return np.clip(np.stack([2 * point - hi, 2 * point - lo]), low, high)


POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def curve_points(prompts: int, most: int = 200) -> np.ndarray:
    """Prompt counts at which to evaluate sample-size curves: all of 0..N, or `most` of them spaced
    geometrically (the curve changes fastest at small n), always including 0 and N."""
    if prompts < most:
        return np.arange(prompts + 1)
    return np.unique(np.concatenate([[0], np.round(np.geomspace(1, prompts, most - 1))]).astype(np.int64))


def sample_size_curve(presence: np.ndarray, valid: np.ndarray, orderings: int, rng: np.random.Generator,
                      points: np.ndarray) -> np.ndarray:
    """int [R, L, len(points)]: experts not yet seen after n prompts (n in `points`, sorted and
    unique), per random ordering and layer.

    Presence is bit-packed along experts, so an ordering costs a running OR over N x L x E / 64 words
    and a popcount at the chosen points."""
    n, layers, experts = presence.shape
    packed = np.zeros((n, layers, -(-experts // 64) * 8), dtype=np.uint8)  # whole uint64 words per layer
    packed[..., : -(-experts // 8)] = np.packbits(presence & valid, axis=-1)
    words = packed.view(np.uint64)
    live = valid.sum(1)
    positive = points[points > 0]
    starts = np.concatenate([[0], positive[:-1]])  # prompts between consecutive points are OR-ed in one go
    curves = np.empty((orderings, layers, len(points)), dtype=np.int64)
    curves[:, :, : len(points) - len(positive)] = live[:, None]
    for r in range(orderings):
        seen = np.bitwise_or.accumulate(np.bitwise_or.reduceat(words[rng.permutation(n)], starts, axis=0), axis=0)
        curves[r, :, len(points) - len(positive):] = live[:, None] - POPCOUNT[seen.view(np.uint8)].sum(-1).T
    return curves


def rarefaction(incidence: np.ndarray, prompts: int, points: np.ndarray | None = None) -> np.ndarray:
    """[..., len(points)] exact mean over all prompt orderings of the experts still unseen after n
    prompts (n in `points`, default 0..N): the sum over experts of C(N - c, n) / C(N, n), where c is
    the number of prompts that touched the expert (c = 0: never seen, counts 1; c < 0: ignored)."""
    points = np.arange(prompts + 1) if points is None else np.asarray(points)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, prompts + 1)))])
    c = np.arange(prompts + 1)[:, None]
    rest = prompts - c - points  # C(N-c, n) / C(N, n) = (N-c)! (N-n)! / ((N-c-n)! N!), zero when n > N-c
    log_ratio = (log_factorial[prompts - c] + log_factorial[prompts - points] - log_factorial[prompts]
                 - log_factorial[np.maximum(rest, 0)])
    table = np.where(rest >= 0, np.exp(log_ratio), 0.0)  # [c, n]
    flat = np.asarray(incidence).reshape(-1, np.shape(incidence)[-1])
    histogram = np.stack([np.bincount(row[row >= 0], minlength=prompts + 1) for row in flat])
    return (histogram @ table).reshape(*np.shape(incidence)[:-1], len(points))


def validate_unseen(presence: np.ndarray, valid: np.ndarray, splits: int, rng: np.random.Generator) -> dict:
    """Estimate from a random half of the prompts, compare with what the other half reveals.

    For each split: predicted = experts the half-sample estimator expects to see in the next N/2
    prompts (extrapolation), actual = experts the other half really adds. Reported per layer
    (mean over splits) with the mean absolute error, next to the naive prediction "nothing new".
    """
    n = presence.shape[0]
    if n < 4:
        return {}
    half = n // 2
    seen_all = (presence.any(0) & valid).sum(-1)
    predicted, actual = [], []
    for _ in range(splits):
        first = np.sort(rng.permutation(n)[:half])
        incidence = np.where(valid, presence[first].sum(0), 0)
        q0 = chao2(incidence, half, valid.sum(1) - (incidence > 0).sum(1))
        seen = (incidence > 0).sum(-1)
        predicted.append(extrapolate(incidence, half, n - half, q0) - seen)
        actual.append(seen_all - seen)
    predicted, actual = np.array(predicted), np.array(actual)
    return {"prompts_used": half, "splits": splits,
            "predicted_new": predicted.mean(0).round(2).tolist(), "actual_new": actual.mean(0).round(2).tolist(),
            "mae": float(np.abs(predicted - actual).mean()), "naive_mae": float(np.abs(actual).mean()),
            "predicted_total": float(predicted.sum(1).mean()), "actual_total": float(actual.sum(1).mean())}
