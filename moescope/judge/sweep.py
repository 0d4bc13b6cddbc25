"""Perplexity per domain against how much is compressed, per method (`moescope sweep prune|quant`).

`sweep prune`: against the share of experts pruned (or merged away), per method and criterion.

The seeds pruned in stages by frequency only; this sweep puts every criterion side by side on the
same held-out data, so "frequency is a poor proxy for importance" becomes a measured statement.
Each (criterion, ratio) point builds a plan from the profile, applies it with the chosen method
(`remove`, `zero` and `row-1e9` through a real rewritten checkpoint in a temporary directory;
`mask` and `soft` as run-time logit offsets, which is what their checkpoint biases do) and
evaluates it with the fixed perplexity protocol of `moescope evaluate`.

With `--methods remove,merge`, merging joins the same table: one merge plan per merge method and
ratio (expert similarity measured once on `--calibration`, `moescope plan merge`), folded with
router rows fitted on the same calibration tokens. With `--repair`, every written checkpoint is
also evaluated after router repair (its routers refitted to the original's routing on
`--calibration`, `moescope prune --repair-router`), as a separate row marked `repaired`. A row's
`variant` names its curve: method, criterion or merge method, and "+repair".

`sweep quant`: against average bits per expert weight, for three plans at each target: uniform
(every expert at the target, where it is a supported width), tiered (experts ranked by importance
alone, the top share at the width above the target and the rest at the width below, in the shares
that make the average; the seeds' tiers with the tier sizes set by the budget) and budget-allocated
(importance x measured distortion, `moescope quantize --budget`; with `--importance fisher` the
Fisher-weighted weight error alone, and tiers ranked by it). A target between widths has no uniform
plan; a width (2, 3, 4, 8) has tiers strictly around it (e.g. 3 and 8 for 4 bits). Each row gives
the plan's actual average. Plans are applied to one model in memory, whose weights are restored
between plans.
"""

from __future__ import annotations

import csv
import io
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from moescope.analysis.merging import check_merge_ratio, make_merge_plan
from moescope.analysis.selection import make_prune_plan
from moescope.backends.hf.loading import load_model, load_tokenizer
from moescope.backends.hf.offload import refuse_offloaded
from moescope.compress.merge import expert_similarity, fit_routers
from moescope.compress.prune import offsets_for, prune_checkpoint, routing_offsets
from moescope.compress.quant.allocation import budget_plan, tiered_plan
from moescope.compress.quant.apply import apply_bit_plan, uniform_plan
from moescope.compress.quant.distortion import allocation_inputs, load_profile_for
from moescope.compress.quant.memory import memory_estimate
from moescope.compress.repair import REPAIR_STEPS, repair_routers
from moescope.compress.routing import calibration_batch, capture_router_io, expert_targets
from moescope.errors import MoescopeError
from moescope.judge.ablation import measured_ablation
from moescope.judge.evaluate import group_perplexities, load_windows
from moescope.output import write_atomic
from moescope.plans import SUPPORTED_BITS, QuantOptions

CHECKPOINT_METHODS = ("remove", "zero", "row-1e9", "merge")


@dataclass
class SweepRouting:
    """The original model's routing on the calibration batch: what merging fits and repair distils."""

    batch: tuple
    captured: dict
    similarity: dict | None  # MoE layer -> expert similarity [E, E], when merging


def sweep_routing(base, tokenizer, methods: list[str], repair: bool, calibration: str | None,
                  prompts: int, max_tokens: int) -> SweepRouting | None:
    if "merge" not in methods and not repair:
        return None
    if not calibration:
        raise MoescopeError("--methods merge and --repair need --calibration FILE: the prompts merged router rows are "
                            "fitted on and repaired routers are matched on")
    unwritten = sorted(set(methods) - set(CHECKPOINT_METHODS))
    if repair and unwritten:
        raise MoescopeError(f"--repair refits the routers of a written checkpoint; {', '.join(unwritten)} run as "
                            "run-time offsets here: sweep them without --repair, or use "
                            f"{', '.join(CHECKPOINT_METHODS)}")
    batch = calibration_batch(tokenizer, calibration, prompts, max_tokens)
    captured = capture_router_io(base, batch)
    similarity = expert_similarity(base, captured) if "merge" in methods else None
    return SweepRouting(batch, captured, similarity)


def sweep_plan(profile, profile_dir: str, method: str, criterion: str, ratio: float, ablation, routing):
    if method == "merge":
        return make_merge_plan(profile, routing.similarity, criterion, ratio,
                               source={"profile": profile_dir, "similarity": "outputs"})
    return make_prune_plan(profile, criterion, ratio=ratio, scores=ablation if criterion == "ablation" else None,
                           profile_path=profile_dir)


def point_perplexities(base, model_dir: str, plan, method: str, windows, protocol, offset: float,
                       routing: SweepRouting | None, repair: bool, steps: int) -> list[tuple[bool, dict, dict]]:
    """[(repaired, perplexity per group, each window's mean NLL per group)] for one plan: as written, and
    after router repair when asked."""
    def scored(model) -> tuple[dict, dict]:
        nll: dict = {}
        return group_perplexities(model, windows, protocol.batch_size, nll), nll

    if method not in CHECKPOINT_METHODS:
        value = float("-inf") if method == "mask" else -offset
        with routing_offsets(base, offsets_for(plan, value)) if plan.prune else nullcontext():
            return [(False, *scored(base))]
    with tempfile.TemporaryDirectory() as tmp:
        routers = fit_routers(base, routing.captured, plan) if method == "merge" else None
        out = prune_checkpoint(model_dir, Path(tmp) / "pruned", plan, method, offset, routers=routers)
        model = load_model(out, protocol.placement)
        results = [(False, *scored(model))]
        if repair:
            repair_routers(model, routing.captured, routing.batch, expert_targets(plan, method), steps)
            results.append((True, *scored(model)))
    return results


def sweep_prune(model_dir: str, profile_dir: str, ratios: list[float], criteria: list[str], methods: str | list[str],
                data: str, protocol, calibration: str | None = None, offset: float = 2.0, *,
                merge_methods: tuple[str, ...] = ("hc-smoe",), repair: bool = False, calibration_prompts: int = 128,
                max_tokens: int = 128, repair_steps: int = REPAIR_STEPS, per_window: dict | None = None) -> list[dict]:
    """One row per (method, criterion or merge method, ratio, repaired, domain, lang): perplexity and its
    ratio to the unpruned model. `per_window`, when given, receives (variant, ratio) -> (domain, lang) ->
    each window's mean NLL per token (("none", 0.0) for the unpruned model), for intervals over the windows."""
    per_window = {} if per_window is None else per_window
    methods = [methods] if isinstance(methods, str) else list(methods)
    base, tokenizer = load_model(model_dir, protocol.placement), load_tokenizer(model_dir)
    if "merge" in methods or repair:
        refuse_offloaded(base, "sweep prune --methods merge or --repair (they refit routers in memory)")
    profile = load_profile_for(base, profile_dir)
    for ratio in ratios if "merge" in methods else []:
        check_merge_ratio(profile, ratio)
    windows = load_windows(data, tokenizer, protocol, base)
    baseline = group_perplexities(base, windows, protocol.batch_size, per_window.setdefault(("none", 0.0), {}))
    ablation = None
    if "ablation" in criteria and any(m != "merge" for m in methods):
        if not calibration:
            raise MoescopeError("--criteria ablation needs --calibration FILE to measure losses on")
        ablation = measured_ablation(profile, model_dir, calibration, windows=8, length=128,
                                     placement=protocol.placement)
    routing = sweep_routing(base, tokenizer, methods, repair, calibration, calibration_prompts, max_tokens)
    rows = [{"variant": "none", "method": "none", "criterion": "none", "ratio": 0.0, "repaired": False,
             "experts_pruned": 0, "domain": d, "lang": g, "perplexity": p, "vs_baseline": 1.0}
            for (d, g), p in baseline.items()]
    points = [(m, c, r) for m in methods for c in (merge_methods if m == "merge" else criteria) for r in ratios]
    for method, criterion, ratio in tqdm(points, desc=f"sweep ({', '.join(methods)})", unit="plan"):
        plan = sweep_plan(profile, profile_dir, method, criterion, ratio, ablation, routing)
        fewer = plan.experts_fewer()
        for repaired, result, nll in point_perplexities(base, model_dir, plan, method, windows, protocol, offset,
                                                        routing, repair, repair_steps):
            variant = f"{method} {criterion}" + (" +repair" if repaired else "")
            per_window[(variant, ratio)] = nll
            rows += [{"variant": variant, "method": method, "criterion": criterion, "ratio": ratio,
                      "repaired": repaired, "experts_pruned": fewer, "domain": d, "lang": g, "perplexity": p,
                      "vs_baseline": p / baseline[(d, g)]} for (d, g), p in result.items()]
    return rows


def sweep_quant(model_dir: str, profile_dir: str | None, targets: list[float], data: str, protocol,
                importance_kind: str = "gate-energy", calibration: str | None = None,
                scales: str = "minmax", symmetric: bool = True) -> list[dict]:
    """One row per (plan, target bits, domain, lang): perplexity and its ratio to the original."""
    for target in targets:
        if not SUPPORTED_BITS[0] <= target <= SUPPORTED_BITS[-1]:
            raise MoescopeError(f"--bits {target:g} is outside {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}")
    model, tokenizer = load_model(model_dir, protocol.placement), load_tokenizer(model_dir)
    refuse_offloaded(model, "sweep quant (it restores the weights between plans)")
    options = QuantOptions(symmetric=symmetric, scales=scales)
    importance, distortion, _ = allocation_inputs(model, importance_kind, profile_dir, SUPPORTED_BITS, options,
                                                  calibration, tokenizer)
    # Tiers rank experts alone: with Fisher weighting, by their estimated loss at the lowest width.
    ranking = distortion[..., 0] if importance_kind == "fisher" else importance
    windows = load_windows(data, tokenizer, protocol, model)
    baseline = group_perplexities(model, windows, protocol.batch_size)
    rows = [{"plan": "original", "target_bits": 16, "avg_bits": 16.0, "domain": d, "lang": g, "perplexity": p,
             "vs_baseline": 1.0} for (d, g), p in baseline.items()]
    original = {name: value.to("cpu", copy=True) for name, value in model.state_dict().items()}  # off the device
    plans = []
    for target in targets:
        if target in SUPPORTED_BITS:
            plans.append(("uniform", target, lambda t=target: uniform_plan(model, int(t), options)))
        if SUPPORTED_BITS[0] < target < SUPPORTED_BITS[-1]:
            plans.append(("tiered", target, lambda t=target: tiered_plan(model, ranking, t, options)))
        plans.append(("budget", target, lambda t=target: budget_plan(model, importance, distortion, SUPPORTED_BITS,
                                                                     avg_bits=t, options=options)))
    for kind, target, make in tqdm(plans, desc="sweep (quant)", unit="plan"):
        plan = make()
        average = memory_estimate(model, plan).expert_bits
        apply_bit_plan(model, plan)
        result = group_perplexities(model, windows, protocol.batch_size)
        model.load_state_dict(original)
        rows += [{"plan": kind, "target_bits": target, "avg_bits": round(average, 4), "domain": d, "lang": g,
                  "perplexity": p, "vs_baseline": p / baseline[(d, g)]} for (d, g), p in result.items()]
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())
