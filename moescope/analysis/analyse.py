"""Every metric of docs/metrics.md for one profile (phases added up), as `moescope stats` prints it.

The parts are computed by their own modules and returned as dataclasses (`Presence` here,
`BalanceIntervals` from the balance module); `analyse` turns them into the JSON-ready summary and
per-layer entries that `stats --json` writes and the report draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moescope.analysis.balance import BalanceIntervals, balance_intervals, hist_quantile, shares, top_count
from moescope.analysis.specificity import clusters, js_specificity, npmi
from moescope.analysis.tiers import TIERS, TierOptions, profile_tiers, tier_counts
from moescope.analysis.uncertainty import (
    bootstrap_mean,
    chao2,
    chao2_variance,
    curve_points,
    lognormal_interval,
    percentile_interval,
    presence_matrix,
    prompts_needed,
    rarefaction,
    sample_size_curve,
    validate_unseen,
)
from moescope.errors import MoescopeError
from moescope.profiling.store import HIST_BINS, Profile


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
        limits = [("--near-dead", self.near_dead, 0 <= self.near_dead <= 1, "in [0, 1]"),
                  ("top_fraction", self.top_fraction, 0 < self.top_fraction <= 1, "in (0, 1]"),
                  ("--coverage", self.coverage, 0 < self.coverage < 1, "in (0, 1)"),
                  ("cluster_npmi", self.cluster_npmi, -1 <= self.cluster_npmi <= 1, "in [-1, 1]")]
        limits += [(name, value, value >= 1, ">= 1") for name, value in
                   (("--bootstrap", self.bootstrap), ("--orderings", self.orderings), ("splits", self.splits))]
        for name, value, ok, allowed in limits:
            if not ok:
                raise MoescopeError(f"{name} {value} is out of range: use a value {allowed}")
        self.tiers.check()
        return self


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


@dataclass
class Presence:
    """What per-prompt presence says: touched shares, experts not yet seen, the sample-size curve."""

    dead: np.ndarray  # [L] experts never chosen
    unseen: np.ndarray  # [L] Chao2 estimate of the dead experts that are used but not yet seen
    unseen_var: np.ndarray  # [L]
    unseen_ci: np.ndarray  # [2, L]
    needed: np.ndarray  # [L] prompts expected to reveal `coverage` of the live experts
    touched: np.ndarray  # [L] mean share of a layer's experts one prompt touches
    touched_ci: np.ndarray  # [2, L]
    curve: dict
    validation: dict


def presence_figures(profile: Profile, valid: np.ndarray, options: StatsOptions,
                     rng: np.random.Generator) -> Presence:
    """The presence part of the analysis (it draws from `rng` before the balance bootstrap does)."""
    num_experts = valid.sum(1)
    presence = presence_matrix(profile) & valid
    n, layers = presence.shape[0], valid.shape[0]
    incidence = presence.sum(0)
    dead = num_experts - (incidence > 0).sum(1)
    q0 = chao2(incidence, n, dead)
    q0_var = chao2_variance(incidence, n, q0)
    q0_ci = np.minimum(lognormal_interval(q0, q0_var), dead)
    per_prompt = presence.sum(-1) / num_experts  # [N, L] share of a layer's experts each prompt touched
    touched, touched_ci = per_prompt.mean(0) if n else np.full(layers, np.nan), np.full((2, layers), np.nan)
    curve, validation = {}, {}
    if n >= 2:
        touched_ci = bootstrap_mean(per_prompt, options.bootstrap, rng)
        points = curve_points(n)
        lo, hi = percentile_interval(sample_size_curve(presence, valid, options.orderings, rng, points).sum(1))
        layers_mean = rarefaction(np.where(valid, incidence, -1), n, points)  # exact mean; the band is simulated
        curve = {"n": points, "dead_mean": layers_mean.sum(0), "dead_lo": lo, "dead_hi": hi,
                 "layers_mean": layers_mean}
        validation = validate_unseen(presence, valid, options.splits, rng)
    return Presence(dead, q0, q0_var, q0_ci, prompts_needed(incidence, n, q0, options.coverage), touched, touched_ci,
                    curve, validation)


def rounded(value, digits: int = 4):
    """JSON-friendly rounding of a scalar or array (NaN -> None)."""
    if np.ndim(value):
        return [rounded(v, digits) for v in np.asarray(value).tolist()]
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


def most_specific(values: np.ndarray, group_counts: np.ndarray, names: list[str]) -> dict:
    """Mean and max specificity of one layer [E], the most specific expert and the group it favours
    (largest share of its selections relative to the layer's share; `group_counts` is [G, E])."""
    if not np.isfinite(values).any():
        return {"mean": None, "max": None, "expert": None, "favours": None}
    best = int(np.nanargmax(values))
    lift = shares(group_counts[:, best]) / np.maximum(shares(group_counts.sum(-1)), 1e-12)
    return {"mean": rounded(np.nanmean(values)), "max": rounded(values[best]), "expert": best,
            "favours": names[int(np.argmax(lift))]}


def missing_parts(profile: Profile, groups: dict) -> list[str]:
    """What the profile lacks, and so what the analysis cannot show."""
    missing = [f"{kind} specificity: the calibration set has only one {kind}"
               for kind, (names, _) in groups.items() if len(names) < 2]
    if "coactivation" not in profile.counters:
        missing.append("co-activation: not recorded (profile with --coactivation)")
    if len(profile.prompts) < 2:
        missing.append(f"uncertainty: the profile has {len(profile.prompts)} prompt(s); the bootstrap, the sample-size "
                       "curve and its validation need at least 2")
    uses = {"weight_hist": "routing-weight percentiles", "entropy_sum": "top-k weight entropy",
            "weight_sum": "criterion gate-mass", "weight_sq": "criterion gate-energy",
            "prompt_counts": "intervals of entropy ratio, Gini and top-n share"}
    missing += [profile.lacks(name, use) for name, use in uses.items() if name in profile.absent]
    if "prompt_counts" not in profile.counters and "prompt_counts" not in profile.absent:
        missing.append("intervals of entropy ratio, Gini and top-n share: the profile has no per-prompt selection "
                       "counts (made by an older moescope or with --no-prompt-counts); profile again to get them")
    if "phases" in profile.settings:
        missing.append(f"the split by phase: {profile.settings['phases']}")
    return missing


def analyse(profile: Profile, options: StatsOptions | None = None) -> Analysis:
    """Every metric of docs/metrics.md for a profile, phases added up."""
    options = (options or StatsOptions()).check()
    tokens = int(profile.counters["tokens"].sum())
    if tokens == 0:
        raise MoescopeError("the profile counted no tokens: profile a non-empty calibration set")
    rng = np.random.default_rng(options.seed)
    num_experts = np.array([x["num_experts"] for x in profile.layers])
    valid = np.arange(profile.num_experts) < num_experts[:, None]
    selections = profile.counters["selections"].sum(0)  # [D, L, E]
    counts = selections.sum(0).astype(np.float64)  # [L, E]
    hist = profile.counters["weight_hist"].sum((0, 2)) if "weight_hist" in profile.counters else \
        np.zeros((len(profile.layers), HIST_BINS), np.int64)  # absent: percentiles come out NaN, shown as none
    groups = {"domain": (profile.domains, selections),
              "lang": (profile.langs, profile.counters["lang_selections"].sum(0))}  # name -> (labels, [G, L, E])
    specificity = {kind: js_specificity(group_counts) for kind, (_, group_counts) in groups.items()}
    npmi_values = coactivation = None
    if "coactivation" in profile.counters:
        coactivation = profile.counters["coactivation"].sum(0)
        npmi_values = npmi(coactivation, counts, tokens)
    presence = presence_figures(profile, valid, options, rng)
    intervals = balance_intervals(counts, profile.counters.get("prompt_counts"), num_experts, options.top_fraction,
                                  options.bootstrap, rng)
    tiers = profile_tiers(profile, options.tiers)
    layers = [layer_entry(profile, row, counts, hist, groups, specificity, presence, intervals, tiers, options)
              for row in range(len(profile.layers))]
    if coactivation is not None:
        for row, entry in enumerate(layers):
            e = entry["num_experts"]
            linked = ((npmi_values[row, :e, :e] >= options.cluster_npmi)
                      & (coactivation[row, :e, :e] >= options.cluster_min_count))
            entry["clusters"] = clusters(linked)
    summary = profile_summary(profile, layers, hist, presence, intervals, tiers, options)
    share = np.where(valid, shares(counts), np.nan)
    return Analysis(summary, layers, share, hist, specificity, presence.curve, npmi_values,
                    missing_parts(profile, groups))


def layer_entry(profile: Profile, row: int, counts: np.ndarray, hist: np.ndarray, groups: dict,
                specificity: dict, presence: Presence, intervals: BalanceIntervals, tiers: np.ndarray,
                options: StatsOptions) -> dict:
    """The JSON entry of one MoE layer."""
    layer = profile.layers[row]
    e, k = layer["num_experts"], layer["top_k"]
    c = counts[row, :e]
    entropy_k = profile.real("entropy_sum")[:, row].sum() / int(profile.counters["tokens"].sum()) \
        if "entropy_sum" in profile.counters else math.nan
    spec = {kind: most_specific(specificity[kind][row, :e], group_counts[:, row, :e], names)
            for kind, (names, group_counts) in groups.items()}
    return {
        "layer": layer["layer"], "num_experts": e, "top_k": k,
        "dead": int((c == 0).sum()), "touched": rounded(presence.touched[row]),
        "touched_ci": rounded(presence.touched_ci[:, row]),
        "near_dead": int(((c > 0) & (shares(c) < options.near_dead / e)).sum()),
        "entropy_ratio": rounded(intervals.point["entropy_ratio"][row]), "gini": rounded(intervals.point["gini"][row]),
        "top_n": top_count(e, options.top_fraction), "top_share": rounded(intervals.point["top_share"][row]),
        "top_ratio": rounded(intervals.point["top_ratio"][row]),
        **{f"{key}_ci": rounded(ci[:, row]) for key, ci in intervals.ci.items()},
        "weight_p50": rounded(hist_quantile(hist[row], 0.5)), "weight_p95": rounded(hist_quantile(hist[row], 0.95)),
        "weight_p99": rounded(hist_quantile(hist[row], 0.99)),
        "topk_entropy": rounded(entropy_k), "topk_entropy_max": rounded(math.log(k)),
        "topk_entropy_ratio": rounded(entropy_k / math.log(k)) if k > 1 else None,
        "unseen": rounded(presence.unseen[row]), "unseen_ci": rounded(presence.unseen_ci[:, row]),
        "unused": rounded(presence.dead[row] - presence.unseen[row]),
        "unused_ci": rounded(presence.dead[row] - presence.unseen_ci[::-1, row]),
        "prompts_needed": int(presence.needed[row]),
        "specificity": spec,
        "critical": np.flatnonzero(tiers[row] == 0).tolist(),
        "tiers": dict(zip(TIERS, map(int, tier_counts(tiers)[row]))),
    }


def profile_summary(profile: Profile, layers: list[dict], hist: np.ndarray, presence: Presence,
                    intervals: BalanceIntervals, tiers: np.ndarray, options: StatsOptions) -> dict:
    """The model-level JSON summary."""
    num_experts = [x["num_experts"] for x in profile.layers]
    tokens_by_phase = profile.counters["tokens"].sum(1)
    unseen_ci = np.minimum(lognormal_interval(presence.unseen.sum(), presence.unseen_var.sum()), presence.dead.sum())
    mean = {key: rounded(np.mean(values)) for key in ("entropy_ratio", "gini", "top_ratio", "topk_entropy_ratio")
            if (values := [x[key] for x in layers if x[key] is not None])}
    return {
        "model": profile.model.to_dict(source=True), "layers": len(layers), "experts": int(sum(num_experts)),
        "top_k": sorted({x["top_k"] for x in profile.layers}), "prompts": len(profile.prompts),
        "tokens": {"prefill": int(tokens_by_phase[0]), "generation": int(tokens_by_phase[1])},
        "domains": profile.domains, "langs": profile.langs,
        "dead": int(sum(x["dead"] for x in layers)), "touched": rounded(presence.touched.mean()),
        "near_dead": int(sum(x["near_dead"] for x in layers)),
        "unseen": rounded(presence.unseen.sum()), "unseen_ci": rounded(unseen_ci),
        "unused": rounded(presence.dead.sum() - presence.unseen.sum()),
        "unused_ci": rounded(presence.dead.sum() - unseen_ci[::-1]),
        "prompts_needed": int(presence.needed.max()), "coverage_target": options.coverage,
        "mean": mean, "mean_ci": {key: rounded(value) for key, value in intervals.mean_ci.items()},
        "weight_p50": rounded(hist_quantile(hist.sum(0), 0.5)), "weight_p95": rounded(hist_quantile(hist.sum(0), 0.95)),
        "weight_p99": rounded(hist_quantile(hist.sum(0), 0.99)),
        "tiers": dict(zip(TIERS, map(int, tier_counts(tiers).sum(0)))), "tier_options": vars(options.tiers),
        "validation": presence.validation,
    }

