"""`moescope plan prune PROFILE ...`: choose experts to prune from a profile, and write a plan.

Criteria give each expert an importance score; the least important go first:
- frequency: how often the expert was chosen (the seeds' criterion; a poor proxy for importance).
- gate-mass: the sum of the routing weights it received.
- saliency: REAP, the mean over the tokens routed to it of weight x L2 norm of its output
  (needs a profile made with `--saliency`).
- ablation: measured, the loss increase on calibration text when that expert alone is masked.

Budgets: `--ratio R` prunes round(R x E) experts in every layer; `--layer-ratios 0:0.1,3:0.3` sets
them per layer (layers not named use --ratio, or 0); `--threshold T` prunes experts whose score is
below T times their layer's mean score. `--protect-domain D` keeps every expert that receives at
least twice its fair share (2/E) of domain D's selections in a layer.

`moescope plan tiers PROFILE --out bits.json` sorts experts into critical / standard / deprioritised /
prune tiers by their load relative to the fair share 1/E (see moescope.tiers) and writes the bit plan
(8 / 4 / 2 / 0 bits by default) that `moescope quantize --plan` reads; `--prune-out` also writes the
prune tier as a prune plan.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import numpy as np

from moescope.errors import MoescopeError

if TYPE_CHECKING:  # moescope.prune imports torch; `plan tiers` and `stats` do not need it
    from moescope.prune import PrunePlan

CRITERIA = ("frequency", "gate-mass", "saliency", "ablation")


def profile_scores(profile, criterion: str) -> np.ndarray:
    """Importance [L, E] from a profile's counters (summed over phases)."""
    selections = profile.counters["selections"].sum(axis=(0, 1)).astype(np.float64)
    if criterion == "frequency":
        return selections
    if criterion == "gate-mass":
        return profile.real("weight_sum").sum(0)
    if criterion == "saliency":
        if "saliency_sum" not in profile.counters:
            raise MoescopeError("this profile has no saliency counters: profile again with --saliency")
        return np.divide(profile.real("saliency_sum").sum(0), selections, out=np.zeros_like(selections),
                         where=selections > 0)
    raise MoescopeError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


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


def parse_layer_ratios(text: str | None) -> dict[int, float]:
    if not text:
        return {}
    try:
        return {int(layer): float(ratio) for layer, ratio in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise MoescopeError(f"--layer-ratios {text!r}: write LAYER:RATIO pairs, e.g. 0:0.1,3:0.25") from None


def choose(scores: np.ndarray, profile, ratio: float | None, layer_ratios: dict[int, float],
           threshold: float | None, protected: np.ndarray) -> dict[int, list[int]]:
    """Experts to prune per layer index: the lowest-scoring unprotected ones within the budget."""
    for value in [ratio, *layer_ratios.values()]:
        if value is not None and not 0 <= value < 1:
            raise MoescopeError(f"ratio {value} is out of range: use a value in [0, 1)")
    if threshold is not None and threshold < 0:
        raise MoescopeError(f"--threshold {threshold} is out of range: use a value >= 0")
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
    from moescope.prune import PrunePlan

    if ratio is None and threshold is None and not layer_ratios:
        raise MoescopeError("give a budget: --ratio R, --layer-ratios, or --threshold T")
    scores = profile_scores(profile, criterion) if scores is None else scores
    protected = protected_experts(profile, list(protect_domains))
    prune = choose(scores, profile, ratio, layer_ratios or {}, threshold, protected)
    plan = PrunePlan(
        model={k: profile.model[k] for k in ("model_type", "config_hash") if k in profile.model},
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


def measured_ablation(profile, model_dir: str, calibration: str, windows: int, length: int) -> np.ndarray:
    """Ablation scores [L, E] for the profile's layers, measured on calibration text."""
    from moescope.calibration import calibration_windows
    from moescope.loading import load_model, load_tokenizer
    from moescope.prune import ablation_scores

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    batch = calibration_windows(calibration, tokenizer, windows, length)
    measured = ablation_scores(model, batch)
    scores = np.zeros(profile.counters["selections"].shape[2:])
    for row, layer in enumerate(profile.layers):
        scores[row, : layer["num_experts"]] = measured[layer["layer"]]
    return scores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_kind", metavar="KIND", required=True)
    prune = sub.add_parser("prune", help="choose experts to prune", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("profile", metavar="PROFILE", help="profile directory from `moescope profile`")
    prune.add_argument("--criterion", choices=CRITERIA, default="gate-mass")
    prune.add_argument("--ratio", type=float, help="share of experts to prune in every layer, e.g. 0.1")
    prune.add_argument("--layer-ratios", help="per-layer shares, LAYER:RATIO,... (others use --ratio)")
    prune.add_argument("--threshold", type=float, help="prune experts scoring below T x their layer's mean")
    prune.add_argument("--protect-domain", action="append", default=[], metavar="D",
                       help="keep experts domain D depends on (repeatable)")
    prune.add_argument("--model", help="checkpoint for --criterion ablation (default: the profile's model)")
    prune.add_argument("--calibration", help="JSONL text for --criterion ablation")
    prune.add_argument("--ablation-windows", type=int, default=8, help="windows of text per ablation (budget)")
    prune.add_argument("--ablation-length", type=int, default=128, help="tokens per window")
    prune.add_argument("--out", required=True, help="plan JSON to write")

    from moescope.stats_cli import add_tier_arguments
    from moescope.tiers import __doc__ as tiers_doc

    tiers = sub.add_parser("tiers", help="sort experts into tiers and write their bit plan", description=tiers_doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    tiers.add_argument("profile", metavar="PROFILE", help="profile directory from `moescope profile`")
    add_tier_arguments(tiers)
    tiers.add_argument("--out", required=True, help="bit plan JSON to write")
    tiers.add_argument("--prune-out", help="also write the prune tier as a prune plan JSON for `moescope prune`")


def run_tiers(args: argparse.Namespace) -> int:
    from moescope.quantize import save_bit_plan
    from moescope.stats import Profile
    from moescope.stats_cli import tier_options
    from moescope.tiers import TIERS, tier_bit_plan

    profile = Profile.load(args.profile)
    plan, prune = tier_bit_plan(profile, tier_options(args), str(args.profile))
    save_bit_plan(plan, args.out)
    bits = plan.source["tier_bits"]
    totals = {t: sum(layer[t] for layer in plan.source["tiers"].values()) for t in TIERS}
    print(f"{args.out}: " + ", ".join(f"{n} {t} ({bits[t]} bits)" for t, n in totals.items()))
    if args.prune_out:
        from moescope.prune import PrunePlan

        PrunePlan(model=plan.model, num_experts={x["layer"]: x["num_experts"] for x in profile.layers},
                  top_k=min(x["top_k"] for x in profile.layers), prune=prune, criterion=f"tiers:{args.criterion}",
                  source=plan.source).save(args.prune_out)
        print(f"{args.prune_out}: {sum(map(len, prune.values()))} prune-tier experts")
    elif any(prune.values()):
        print("prune-tier experts are written at the lowest bits; pass --prune-out to write them as a prune plan")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.plan_kind == "tiers":
        return run_tiers(args)
    from moescope.stats import Profile

    profile = Profile.load(args.profile)
    scores = None
    if args.criterion == "ablation":
        model_dir = args.model or profile.model.get("source")
        if not model_dir or not args.calibration:
            raise MoescopeError("--criterion ablation needs --calibration FILE (and --model DIR if the profile "
                                "does not record where its model is)")
        scores = measured_ablation(profile, model_dir, args.calibration, args.ablation_windows, args.ablation_length)
    plan = make_prune_plan(profile, args.criterion, ratio=args.ratio,
                           layer_ratios=parse_layer_ratios(args.layer_ratios), threshold=args.threshold,
                           protect_domains=tuple(args.protect_domain), scores=scores, profile_path=str(args.profile))
    plan.save(args.out)
    pruned = sum(len(v) for v in plan.prune.values())
    total = sum(plan.num_experts.values())
    print(f"{args.out}: {pruned} of {total} experts to prune ({pruned / total:.1%}), criterion {args.criterion}")
    return 0
