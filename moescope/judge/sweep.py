"""Perplexity per domain against how much is compressed, per method (`moescope sweep prune|quant`).

`sweep prune`: against the share of experts pruned, per criterion.

The seeds pruned in stages by frequency only; this sweep puts every criterion side by side on the
same held-out data, so "frequency is a poor proxy for importance" becomes a measured statement.
Each (criterion, ratio) point builds a plan from the profile, applies it with the chosen method
(`remove`, `zero` and `row-1e9` through a real rewritten checkpoint in a temporary directory;
`mask` and `soft` as run-time logit offsets, which is what their checkpoint biases do) and
evaluates it with the fixed perplexity protocol of `moescope evaluate`.

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
from pathlib import Path

from tqdm import tqdm

from moescope.analysis.selection import make_prune_plan
from moescope.backends.hf.loading import load_model, load_tokenizer
from moescope.compress.prune import offsets_for, prune_checkpoint, routing_offsets
from moescope.compress.quant.allocation import budget_plan, tiered_plan
from moescope.compress.quant.apply import apply_bit_plan, uniform_plan
from moescope.compress.quant.distortion import allocation_inputs
from moescope.compress.quant.memory import memory_estimate
from moescope.errors import MoescopeError
from moescope.judge.ablation import measured_ablation
from moescope.judge.evaluate import group_perplexities, load_windows
from moescope.output import write_atomic
from moescope.plans import SUPPORTED_BITS, QuantOptions
from moescope.profiling.store import Profile

CHECKPOINT_METHODS = ("remove", "zero", "row-1e9")


def sweep_prune(model_dir: str, profile_dir: str, ratios: list[float], criteria: list[str], method: str,
                data: str, protocol, calibration: str | None = None, offset: float = 2.0,
                per_window: dict | None = None) -> list[dict]:
    """One row per (criterion, ratio, domain, lang): perplexity and its ratio to the unpruned model.
    `per_window`, when given, receives (criterion, ratio) -> (domain, lang) -> each window's mean NLL per
    token (("none", 0.0) for the unpruned model), for intervals over the evaluation windows."""
    per_window = {} if per_window is None else per_window
    profile = Profile.load(profile_dir)
    base, tokenizer = load_model(model_dir, dtype=protocol.dtype), load_tokenizer(model_dir)
    windows = load_windows(data, tokenizer, protocol, base)
    baseline = group_perplexities(base, windows, protocol.batch_size, per_window.setdefault(("none", 0.0), {}))
    ablation = None
    if "ablation" in criteria:
        if not calibration:
            raise MoescopeError("--criteria ablation needs --calibration FILE to measure losses on")
        ablation = measured_ablation(profile, model_dir, calibration, windows=8, length=128)
    rows = [{"criterion": "none", "ratio": 0.0, "method": method, "experts_pruned": 0, "domain": d, "lang": g,
             "perplexity": p, "vs_baseline": 1.0} for (d, g), p in baseline.items()]
    points = [(c, r) for c in criteria for r in ratios]
    for criterion, ratio in tqdm(points, desc=f"sweep ({method})", unit="plan"):
        plan = make_prune_plan(profile, criterion, ratio=ratio, scores=ablation if criterion == "ablation" else None,
                               profile_path=profile_dir)
        nll = per_window.setdefault((criterion, ratio), {})
        if method in CHECKPOINT_METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                out = prune_checkpoint(model_dir, Path(tmp) / "pruned", plan, method, offset)
                result = group_perplexities(load_model(out, dtype=protocol.dtype), windows, protocol.batch_size, nll)
        else:
            value = float("-inf") if method == "mask" else -offset
            with routing_offsets(base, offsets_for(plan, value)) if plan.prune else nullcontext():
                result = group_perplexities(base, windows, protocol.batch_size, nll)
        pruned = sum(len(v) for v in plan.prune.values())
        rows += [{"criterion": criterion, "ratio": ratio, "method": method, "experts_pruned": pruned, "domain": d,
                  "lang": g, "perplexity": p, "vs_baseline": p / baseline[(d, g)]} for (d, g), p in result.items()]
    return rows


def sweep_quant(model_dir: str, profile_dir: str | None, targets: list[float], data: str, protocol,
                importance_kind: str = "gate-energy", calibration: str | None = None,
                scales: str = "minmax", symmetric: bool = True) -> list[dict]:
    """One row per (plan, target bits, domain, lang): perplexity and its ratio to the original."""
    for target in targets:
        if not SUPPORTED_BITS[0] <= target <= SUPPORTED_BITS[-1]:
            raise MoescopeError(f"--bits {target:g} is outside {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}")
    model, tokenizer = load_model(model_dir, dtype=protocol.dtype), load_tokenizer(model_dir)
    options = QuantOptions(symmetric=symmetric, scales=scales)
    importance, distortion, _ = allocation_inputs(model, importance_kind, profile_dir, SUPPORTED_BITS, options,
                                                  calibration, tokenizer)
    # Tiers rank experts alone: with Fisher weighting, by their estimated loss at the lowest width.
    ranking = distortion[..., 0] if importance_kind == "fisher" else importance
    windows = load_windows(data, tokenizer, protocol, model)
    baseline = group_perplexities(model, windows, protocol.batch_size)
    rows = [{"plan": "original", "target_bits": 16, "avg_bits": 16.0, "domain": d, "lang": g, "perplexity": p,
             "vs_baseline": 1.0} for (d, g), p in baseline.items()]
    original = {name: value.clone() for name, value in model.state_dict().items()}
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
