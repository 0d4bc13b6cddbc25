"""Routing metrics of a profile, with their uncertainty. Formulas and reasons: docs/metrics.md.

Array functions reduce over the last axis (experts), so they apply to one layer or to a stack of
layers or bootstrap resamples alike. `analyse` combines them for a `Profile` (phases added up).

Uncertainty comes from the per-prompt data a profile keeps. Presence (which experts each prompt
touched) gives the sample-size curve and the unseen-expert estimate (Chao2, the incidence form of
Chao1), computed on incidence counts, i.e. how many prompts touched each expert, and from it the
experts truly unused (dead minus unseen; the dead count itself is not bootstrapped). Per-prompt
selection counts give bootstrap intervals over prompts for the balance metrics (entropy ratio,
Gini, top-n share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moescope.errors import MoescopeError
from moescope.stats import HIST_EDGES, Profile
from moescope.tiers import TIERS, TierOptions, profile_tiers, tier_counts


@dataclass
class StatsOptions:
    near_dead: float = 0.1  # near-dead: load below this multiple of the fair share 1/E (but not zero)
    top_fraction: float = 0.1  # top-n share with n = this share of a layer's experts (at least 1)
    bootstrap: int = 200  # bootstrap resamples of the prompts
    orderings: int = 100  # random prompt orderings for the sample-size curve
    splits: int = 20  # random half splits to validate the unseen-expert estimate
    coverage: float = 0.99  # "prompts needed" to observe this share of the estimated live experts
    cluster_npmi: float = 0.5  # co-activation clusters link experts with NPMI at least this ...
    cluster_min_count: int = 5  # ... over at least this many shared tokens
    seed: int = 0
    tiers: TierOptions = field(default_factory=TierOptions)

    def check(self) -> StatsOptions:
        """Raise MoescopeError for a setting out of range (named as its command-line option)."""
        limits = [("--near-dead", self.near_dead, 0 <= self.near_dead <= 1, "[0, 1]"),
                  ("top_fraction", self.top_fraction, 0 < self.top_fraction <= 1, "(0, 1]"),
                  ("--coverage", self.coverage, 0 < self.coverage < 1, "(0, 1)"),
                  ("cluster_npmi", self.cluster_npmi, -1 <= self.cluster_npmi <= 1, "[-1, 1]")]
        limits += [(name, value, value >= 1, ">= 1") for name, value in
                   (("--bootstrap", self.bootstrap), ("--orderings", self.orderings), ("splits", self.splits))]
        for name, value, ok, allowed in limits:
            if not ok:
                raise MoescopeError(f"{name} {value} is out of range: use a value in {allowed}")
        self.tiers.check()
        return self


# ---------------------------------------------------------------- concentration


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


# ---------------------------------------------------------------- specificity and co-activation


def js_specificity(group_counts: np.ndarray) -> np.ndarray:
    """[..., E] Jensen-Shannon divergence (bits, 0..1) of each expert's group mix from its layer's.

    `group_counts` is [G, ..., E] (selections by domain or by language). The layer's mix is the token
    mix of the calibration set (every token makes top-k selections in every layer), so an expert
    indifferent to the groups scores 0 whatever the groups' sizes. NaN for experts never selected.
    """
    counts = np.asarray(group_counts, dtype=np.float64)
    expert_total = counts.sum(0)
    p = np.divide(counts, expert_total, out=np.zeros_like(counts), where=expert_total > 0)
    layer = counts.sum(-1, keepdims=True)
    q = np.broadcast_to(layer / np.maximum(layer.sum(0), 1), counts.shape)
    m = (p + q) / 2

    def kl(a):
        return (a * np.log2(np.divide(a, m, out=np.ones_like(a), where=a > 0))).sum(0)

    return np.where(expert_total > 0, np.clip((kl(p) + kl(q)) / 2, 0, 1), np.nan)


def npmi(coactivation: np.ndarray, selections: np.ndarray, tokens: float) -> np.ndarray:
    """[..., E, E] normalised PMI of two experts being chosen for the same token: -1 never together,
    0 independent, 1 always together. The diagonal is NaN."""
    p_ij = np.asarray(coactivation, dtype=np.float32) / np.float32(tokens)  # float32: E x E per layer is large
    log_i = np.log(np.maximum(np.asarray(selections, dtype=np.float64) / tokens, 1e-300)).astype(np.float32)
    log_ij = np.log(p_ij, where=p_ij > 0, out=np.full_like(p_ij, -np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (log_ij - log_i[..., :, None] - log_i[..., None, :]) / -log_ij
    value[p_ij >= 1] = 1.0
    value[p_ij == 0] = -1.0
    value[..., np.arange(value.shape[-1]), np.arange(value.shape[-1])] = np.nan
    return value


def clusters(linked: np.ndarray) -> list[list[int]]:
    """Connected components (size >= 2) of a symmetric bool adjacency matrix [E, E]."""
    seen = np.zeros(len(linked), dtype=bool)
    found = []
    for start in np.flatnonzero(linked.any(1)):
        if seen[start]:
            continue
        component, frontier = {int(start)}, [int(start)]
        while frontier:
            new = set(np.flatnonzero(linked[frontier].any(0)).tolist()) - component
            component |= new
            frontier = list(new)
        seen[list(component)] = True
        found.append(sorted(component))
    return found


# ---------------------------------------------------------------- uncertainty from presence


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
    """Total prompts expected to reveal `coverage` of the estimated live experts (S_obs + Q0): the
    extrapolation above solved for the number of additional prompts."""
    seen = (incidence > 0).sum(-1)
    q1 = (incidence == 1).sum(-1)
    missing = coverage * (seen + q0) - seen
    step = np.divide(q1, prompts * q0 + q1, out=np.zeros(np.shape(q0)), where=prompts * q0 + q1 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        more = np.log(1 - missing / q0) / np.log(1 - step)
    return np.where(missing > 0, prompts + np.ceil(np.nan_to_num(more, nan=0.0, posinf=0.0)), prompts)


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


def basic_interval(point: np.ndarray, samples: np.ndarray, low: float = -np.inf,
                   high: float = np.inf) -> np.ndarray:
    """[2, ...] 95 % basic (reverse percentile) bootstrap interval [2 t - q97.5, 2 t - q2.5] of the
    estimate t, clipped to [low, high]. Plug-in statistics of pooled counts (entropy, Gini) are
    biased, and the resamples carry the same bias again; reflecting the percentiles about t removes
    it where the plain percentile interval doubles it (docs/metrics.md: coverage)."""
    lo, hi = percentile_interval(samples)
    return np.clip(np.stack([2 * point - hi, 2 * point - lo]), low, high)


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


# ---------------------------------------------------------------- the whole profile


@dataclass
class Analysis:
    """Everything `moescope stats` prints and `moescope report` draws. `summary` and `layers` are JSON-ready."""

    summary: dict
    layers: list[dict]
    share: np.ndarray  # [L, E] selection share per layer (NaN in padding slots)
    weight_hist: np.ndarray  # [L, B] routing weights pooled over experts
    specificity: dict[str, np.ndarray]  # "domain" / "lang" -> [L, E] JS divergence
    curve: dict  # n (prompt counts), dead_mean / dead_lo / dead_hi (all layers), layers_mean [L, len(n)]
    npmi: np.ndarray | None  # [L, E, E] when co-activation was recorded
    missing: list[str]  # what the profile lacks and so what is not shown

    def to_json(self) -> dict:
        return {"summary": self.summary, "layers": self.layers, "missing": self.missing,
                "sample_size_curve": {k: np.asarray(v).round(3).tolist() for k, v in self.curve.items()}}


def most_specific(values: np.ndarray, group_counts: np.ndarray, names: list[str]) -> dict:
    """Mean and max specificity of one layer [E], the most specific expert and the group it favours
    (largest share of its selections relative to the layer's share; `group_counts` is [G, E])."""
    if not np.isfinite(values).any():
        return {"mean": None, "max": None, "expert": None, "favours": None}
    best = int(np.nanargmax(values))
    lift = shares(group_counts[:, best]) / np.maximum(shares(group_counts.sum(-1)), 1e-12)
    return {"mean": _round(np.nanmean(values)), "max": _round(values[best]), "expert": best,
            "favours": names[int(np.argmax(lift))]}


def analyse(profile: Profile, options: StatsOptions | None = None) -> Analysis:
    """Every metric of docs/metrics.md for a profile, phases added up."""
    options = (options or StatsOptions()).check()
    tokens = int(profile.counters["tokens"].sum())
    if tokens == 0:
        raise MoescopeError("the profile counted no tokens: profile a non-empty calibration set")
    rng = np.random.default_rng(options.seed)
    num_experts = np.array([x["num_experts"] for x in profile.layers])
    top_k = [x["top_k"] for x in profile.layers]
    L, E = len(profile.layers), profile.num_experts
    valid = np.arange(E) < num_experts[:, None]
    selections = profile.counters["selections"].sum(0)  # [D, L, E]
    counts = selections.sum(0).astype(np.float64)  # [L, E]
    share = np.where(valid, shares(counts), np.nan)
    point = balance(counts, num_experts, options.top_fraction)  # [L] each
    tiers = profile_tiers(profile, options.tiers)
    hist = profile.counters["weight_hist"].sum((0, 2))
    groups = {"domain": (profile.domains, selections),
              "lang": (profile.langs, profile.counters["lang_selections"].sum(0))}  # name -> (labels, [G, L, E])
    specificity = {kind: js_specificity(group_counts) for kind, (_, group_counts) in groups.items()}
    missing = [f"{kind} specificity: the calibration set has only one {kind}"
               for kind, (names, _) in groups.items() if len(names) < 2]
    npmi_values = coactivation = None
    if "coactivation" in profile.counters:
        coactivation = profile.counters["coactivation"].sum(0)
        npmi_values = npmi(coactivation, counts, tokens)
    else:
        missing.append("co-activation: not recorded (profile with --coactivation)")

    presence = presence_matrix(profile) & valid
    n = presence.shape[0]
    incidence = presence.sum(0)
    dead_now = valid.sum(1) - (incidence > 0).sum(1)
    q0 = chao2(incidence, n, dead_now)
    q0_var = chao2_variance(incidence, n, q0)
    q0_ci = np.minimum(lognormal_interval(q0, q0_var), dead_now)
    per_prompt = presence.sum(-1) / num_experts  # [N, L] share of a layer's experts each prompt touched
    touched, touched_ci = per_prompt.mean(0) if n else np.full(L, np.nan), np.full((2, L), np.nan)
    balance_ci = dict.fromkeys(BALANCE_RANGE, np.full((2, L), np.nan))
    mean_ci = {}
    if n >= 2:
        touched_ci = bootstrap_mean(per_prompt, options.bootstrap, rng)
        points = curve_points(n)
        lo, hi = percentile_interval(sample_size_curve(presence, valid, options.orderings, rng, points).sum(1))
        layers_mean = rarefaction(np.where(valid, incidence, -1), n, points)  # exact mean; the band is simulated
        curve = {"n": points, "dead_mean": layers_mean.sum(0), "dead_lo": lo, "dead_hi": hi,
                 "layers_mean": layers_mean}
        validation = validate_unseen(presence, valid, options.splits, rng)
        if "prompt_counts" in profile.counters:
            samples = bootstrap_balance(profile.counters["prompt_counts"], num_experts, options.top_fraction,
                                        options.bootstrap, rng)
            balance_ci = {key: basic_interval(point[key], samples[key], *BALANCE_RANGE[key]) for key in samples}
            mean_ci = {key: _round(basic_interval(point[key].mean(), samples[key].mean(1), *BALANCE_RANGE[key]))
                       for key in ("entropy_ratio", "gini", "top_ratio")}
    else:
        missing.append(f"uncertainty: the profile has {n} prompt(s); the bootstrap, the sample-size curve and its "
                       "validation need at least 2")
        curve, validation = {}, {}
    if "prompt_counts" not in profile.counters:
        missing.append("intervals of entropy ratio, Gini and top-n share: the profile has no per-prompt selection "
                       "counts (made by an older moescope or with --no-prompt-counts); profile again to get them")
    needed = prompts_needed(incidence, n, q0, options.coverage)

    tokens_by_phase = profile.counters["tokens"].sum(1)
    counts_tiers = tier_counts(tiers)
    layers = []
    for row, layer in enumerate(profile.layers):
        e, k = layer["num_experts"], layer["top_k"]
        c = counts[row, :e]
        top_n = top_count(e, options.top_fraction)
        entropy_k = profile.real("entropy_sum")[:, row].sum() / tokens
        spec = {kind: most_specific(specificity[kind][row, :e], group_counts[:, row, :e], names)
                for kind, (names, group_counts) in groups.items()}
        entry = {
            "layer": layer["layer"], "num_experts": e, "top_k": k,
            "dead": int((c == 0).sum()), "touched": _round(touched[row]), "touched_ci": _round(touched_ci[:, row]),
            "near_dead": int(((c > 0) & (shares(c) < options.near_dead / e)).sum()),
            "entropy_ratio": _round(point["entropy_ratio"][row]), "gini": _round(point["gini"][row]),
            "top_n": top_n, "top_share": _round(point["top_share"][row]),
            "top_ratio": _round(point["top_ratio"][row]),
            **{f"{key}_ci": _round(ci[:, row]) for key, ci in balance_ci.items()},
            "weight_p50": _round(hist_quantile(hist[row], 0.5)), "weight_p95": _round(hist_quantile(hist[row], 0.95)),
            "weight_p99": _round(hist_quantile(hist[row], 0.99)),
            "topk_entropy": _round(entropy_k), "topk_entropy_max": _round(math.log(k)),
            "topk_entropy_ratio": _round(entropy_k / math.log(k)) if k > 1 else None,
            "unseen": _round(q0[row]), "unseen_ci": _round(q0_ci[:, row]),
            "unused": _round(dead_now[row] - q0[row]), "unused_ci": _round(dead_now[row] - q0_ci[::-1, row]),
            "prompts_needed": int(needed[row]),
            "specificity": spec,
            "critical": np.flatnonzero(tiers[row] == 0).tolist(),
            "tiers": dict(zip(TIERS, map(int, counts_tiers[row]))),
        }
        if coactivation is not None:
            linked = ((npmi_values[row, :e, :e] >= options.cluster_npmi)
                      & (coactivation[row, :e, :e] >= options.cluster_min_count))
            entry["clusters"] = clusters(linked)
        layers.append(entry)

    unseen_ci = np.minimum(lognormal_interval(q0.sum(), q0_var.sum()), dead_now.sum())
    mean = {key: _round(np.mean(values)) for key in ("entropy_ratio", "gini", "top_ratio", "topk_entropy_ratio")
            if (values := [x[key] for x in layers if x[key] is not None])}
    summary = {
        "model": profile.model, "layers": L, "experts": int(num_experts.sum()), "top_k": sorted(set(top_k)),
        "prompts": n, "tokens": {"prefill": int(tokens_by_phase[0]), "generation": int(tokens_by_phase[1])},
        "domains": profile.domains, "langs": profile.langs,
        "dead": int(sum(x["dead"] for x in layers)), "touched": _round(touched.mean()),
        "near_dead": int(sum(x["near_dead"] for x in layers)),
        "unseen": _round(q0.sum()), "unseen_ci": _round(unseen_ci),
        "unused": _round(dead_now.sum() - q0.sum()), "unused_ci": _round(dead_now.sum() - unseen_ci[::-1]),
        "prompts_needed": int(needed.max()), "coverage_target": options.coverage,
        "mean": mean, "mean_ci": mean_ci,
        "weight_p50": _round(hist_quantile(hist.sum(0), 0.5)), "weight_p95": _round(hist_quantile(hist.sum(0), 0.95)),
        "weight_p99": _round(hist_quantile(hist.sum(0), 0.99)),
        "tiers": dict(zip(TIERS, map(int, counts_tiers.sum(0)))), "tier_options": vars(options.tiers),
        "validation": validation,
    }
    return Analysis(summary, layers, share, hist, specificity, curve, npmi_values, missing)


def _round(value, digits: int = 4):
    """JSON-friendly rounding of a scalar or array (NaN -> None)."""
    if np.ndim(value):
        return [_round(v, digits) for v in np.asarray(value).tolist()]
    value = float(value)
    return None if math.isnan(value) else round(value, digits)
