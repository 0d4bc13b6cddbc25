"""Which experts to prune, chosen from a profile: the least important within a budget, never below top-k.

Budgets: a ratio R prunes round(R x E) experts in every layer; layer ratios set it per layer (layers
not named use the ratio, or 0); a threshold T prunes experts whose score is below T times their
layer's mean score. Protected domains keep every expert that receives at least twice its fair share
(2/E) of that domain's selections in a layer.
"""

from __future__ import annotations

import numpy as np

from moescope.analysis.criteria import profile_scores
from moescope.errors import MoescopeError
from moescope.plans import PrunePlan


def protected_experts(profile, domains: list[str], factor: float = 2.0) -> np.ndarray:
    """bool [L, E]: experts holding at least `factor` x the fair share of a protected domain's selections."""
    protected = np.zeros(profile.counters["selections"].shape[2:], dtype=bool)
    for domain in domains:
        if domain not in profile.domains:
            raise MoescopeError(f"--protect-domain {domain}: the profile has no such domain "
                                f"(it has {', '.join(profile.domains)})")
        counts = profile.counters["selections"][:, profile.domains.index(domain)].sum(0).astype(np.float64)
        for row, layer in enumerate(profile.layers):
            total = counts[row].sum()
            if total:
                protected[row] |= counts[row] / total >= factor / layer["num_experts"]
    return protected


def choose(scores: np.ndarray, profile, ratio: float | None, layer_ratios: dict[int, float],
           threshold: float | None, protected: np.ndarray) -> dict[int, list[int]]:
    """Experts to prune per layer index: the lowest-scoring unprotected ones within the budget."""
    for value in [ratio, *layer_ratios.values()]:
        if value is not None and not 0 <= value < 1:
            raise MoescopeError(f"ratio {value} is out of range: use a value in [0, 1)")
    if threshold is not None and not threshold >= 0:  # NaN too
        raise MoescopeError(f"--threshold {threshold} is out of range: use a value >= 0")
    unknown = sorted(set(layer_ratios) - {layer["layer"] for layer in profile.layers})
    if unknown:
        raise MoescopeError(f"--layer-ratios names layer {unknown[0]}, which is not an MoE layer of the profile "
                            f"(its MoE layers: {', '.join(str(x['layer']) for x in profile.layers)})")
    prune = {}
    for row, layer in enumerate(profile.layers):
        experts = layer["num_experts"]
        layer_scores = scores[row, :experts]
        order = [int(e) for e in np.argsort(layer_scores, kind="stable") if not protected[row, e]]
        if threshold is not None:
            chosen = [e for e in order if layer_scores[e] < threshold * layer_scores.mean()]
        else:
            share = layer_ratios.get(layer["layer"], ratio or 0.0)
            chosen = order[: int(round(share * experts))]
        prune[layer["layer"]] = sorted(chosen)
    return prune


def make_prune_plan(profile, criterion: str, *, ratio: float | None = None, layer_ratios: dict | None = None,
                    threshold: float | None = None, protect_domains: tuple[str, ...] = (),
                    scores: np.ndarray | None = None, profile_path: str = "") -> PrunePlan:
    """A prune plan from a profile; `scores` [L, E] overrides the profile's (ablation)."""
    if ratio is None and threshold is None and not layer_ratios:
        raise MoescopeError("give a budget: --ratio R, --layer-ratios, or --threshold T")
    scores = profile_scores(profile, criterion) if scores is None else scores
    protected = protected_experts(profile, list(protect_domains))
    prune = choose(scores, profile, ratio, layer_ratios or {}, threshold, protected)
    plan = PrunePlan(
        model=profile.model,
        num_experts={layer["layer"]: layer["num_experts"] for layer in profile.layers},
        top_k=min(layer["top_k"] for layer in profile.layers),
        prune=prune, criterion=criterion,
        source={"profile": profile_path, "calibration_hash": profile.calibration_hash, "ratio": ratio,
                "layer_ratios": layer_ratios or {}, "threshold": threshold, "protect_domains": list(protect_domains),
                "scores": {str(layer["layer"]): [round(float(s), 6) for s in scores[row, :layer["num_experts"]]]
                           for row, layer in enumerate(profile.layers)}},
    )
    for layer in plan.prune:
        if len(plan.kept(layer)) < plan.top_k:
            raise MoescopeError(f"the budget leaves layer {layer} with fewer than top-k = {plan.top_k} experts: "
                                "lower the ratio")
    return plan
