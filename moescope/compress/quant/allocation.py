"""Bits per expert under a budget: the allocation that minimises sum(importance x distortion).

`allocate_bits` is the greedy on the lower convex hull of each expert's (cost, loss) options;
`budget_plan` turns it into a bit plan within average bits or a byte size (as `memory_estimate`
counts it); `tiered_plan` is the seeds' two-tier plan with the tier sizes set by the budget.
"""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from moescope.backends.hf.loading import model_identity
from moescope.compress.quant.apply import expert_params, uniform_plan
from moescope.compress.quant.memory import format_bytes, matrix_bytes, memory_estimate
from moescope.errors import MoescopeError
from moescope.models.layout import expert_matrices
from moescope.models.registry import find_moe_layers
from moescope.plans import SUPPORTED_BITS, UNQUANTISED, BitPlan, QuantOptions, check_bits


def allocate_bits(importance: np.ndarray, distortion: np.ndarray, cost: np.ndarray, budget: float) -> np.ndarray:
    """Choose one option per expert minimising sum(importance * distortion) with sum(cost) <= budget.

    importance [L, E] (any non-negative weights), distortion and cost [L, E, K] (cost may broadcast).
    Returns the chosen option index per expert, [L, E]. Each expert starts at its cheapest option;
    upgrades along the lower convex hull of its (cost, loss) options are taken in decreasing order
    of loss saved per unit cost, skipping (and closing) an expert whose next upgrade no longer fits.
    Only upgrades that fit are taken, so the result is always within budget; it is the Lagrangian
    optimum at the multiplier where the budget binds, plus whatever else still fits.
    """
    importance = np.asarray(importance, dtype=np.float64)
    distortion = np.asarray(distortion, dtype=np.float64)
    cost = np.broadcast_to(np.asarray(cost, dtype=np.float64), distortion.shape)
    if importance.shape != distortion.shape[:-1]:
        raise MoescopeError(f"importance {importance.shape} does not match distortion {distortion.shape[:-1]}")
    if not (np.isfinite(importance).all() and np.isfinite(distortion).all()) or (importance < 0).any():
        raise MoescopeError("importance must be finite and non-negative, and distortion finite")
    loss = (importance[..., None] * distortion).reshape(-1, distortion.shape[-1])
    cost = cost.reshape(loss.shape)
    choice = np.lexsort((loss, cost), axis=-1)[:, 0]  # cheapest option, the better one on ties
    items = np.arange(len(loss))
    spent = cost[items, choice].sum()
    if spent > budget:
        raise MoescopeError(f"budget {budget:g} is below the minimum possible {spent:g} "
                            f"(every expert at its cheapest option)")
    steps = []  # (saving per unit cost, item, step number, option, extra cost)
    for item in items:
        at, number = choice[item], 0
        while True:
            up = (cost[item] > cost[item, at]) & (loss[item] <= loss[item, at])
            if not up.any():
                break
            rate = np.where(up, (loss[item, at] - loss[item]) / np.where(up, cost[item] - cost[item, at], 1), -1)
            best = np.flatnonzero(rate == rate.max())
            nxt = best[np.argmin(cost[item, best])]  # on equal rates the smaller step: finer budget fit
            steps.append((rate[nxt], item, number, nxt, cost[item, nxt] - cost[item, at]))
            at, number = nxt, number + 1
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    closed = set()
    for _, item, _, option, extra in steps:
        if item in closed:
            continue
        if spent + extra <= budget:
            choice[item], spent = option, spent + extra
        else:
            closed.add(item)
    return choice.reshape(importance.shape)


def budget_plan(model: nn.Module, importance: np.ndarray, distortion: np.ndarray,
                bits: tuple[int, ...] = SUPPORTED_BITS, *, avg_bits: float | None = None,
                max_bytes: float | None = None, options: QuantOptions | None = None, per_layer: bool = False,
                source: dict | None = None) -> BitPlan:
    """The plan minimising sum(importance * distortion) within `avg_bits` (mean bits per expert
    weight, scales not counted) or `max_bytes` (the whole packed model, as `memory_estimate`).

    importance [MoE layers, experts]; distortion [MoE layers, experts, len(bits)] (`weight_distortion`).
    `per_layer` gives all experts of a layer one width (what runtimes can serve), chosen for the
    same objective and budget.
    """
    options = options or QuantOptions()
    if (avg_bits is None) == (max_bytes is None):
        raise MoescopeError("give exactly one budget: average bits or a size in bytes")
    if not math.isfinite(avg_bits if avg_bits is not None else max_bytes):
        raise MoescopeError("the budget must be a finite number of average bits or bytes")
    for b in bits:
        check_bits(b)
    layers = find_moe_layers(model)
    bits_array = np.array(bits, dtype=np.float64)
    distortion = np.asarray(distortion, dtype=np.float64)
    expected = (len(layers), layers[0].num_experts, len(bits))
    if distortion.shape != expected:
        raise MoescopeError(f"distortion has shape {distortion.shape}; this model and {len(bits)} bit options "
                            f"need {expected}")
    if avg_bits is not None:
        params = expert_params(model).astype(np.float64)[:, None, None]
        cost = np.broadcast_to(params * bits_array, distortion.shape)
        budget = avg_bits * params.sum() * expected[1]
        lowest, what = f"{bits_array.min():g} average bits", f"{avg_bits:g} average bits"
    else:
        cost = np.array([[sum(matrix_bytes(*w.shape, b, options) for w in expert_matrices(layer)) for b in bits]
                         for layer in layers], dtype=np.float64)[:, None, :]
        cost = np.broadcast_to(cost, distortion.shape)
        fixed = memory_estimate(model, uniform_plan(model, UNQUANTISED, options))
        fixed_bytes = fixed.non_expert_bytes + fixed.other_bytes
        budget = max_bytes - fixed_bytes
        lowest, what = format_bytes(fixed_bytes + cost.min(-1).sum()), format_bytes(max_bytes)
    if cost.min(-1).sum() > budget:
        raise MoescopeError(f"budget {what} is below the minimum possible {lowest} (every expert at "
                            f"{min(bits)} bits)")
    if per_layer:  # one item per layer: its experts' summed loss and cost
        loss = (np.asarray(importance, dtype=np.float64)[..., None] * distortion).sum(1, keepdims=True)
        choice = allocate_bits(np.ones(loss.shape[:2]), loss, cost.sum(1, keepdims=True), budget)
        choice = np.broadcast_to(choice, expected[:2])
    else:
        choice = allocate_bits(importance, distortion, cost, budget)
    plan = {layer.index: [int(bits_array[k]) for k in row] for layer, row in zip(layers, choice, strict=True)}
    source = {"avg_bits": avg_bits, "max_bytes": max_bytes, "per_layer": per_layer, **(source or {})}
    return BitPlan.made_with(options, plan, model_identity(model), "budget", source)


def tiered_plan(model, importance, avg_bits: float, options):
    """Two tiers by importance around `avg_bits`: the most important experts at the next supported
    width above it (strictly above when it is a width), the rest at the width below, the top tier as
    large as the average allows."""
    lower = [w for w in SUPPORTED_BITS if w < avg_bits]
    upper = [w for w in SUPPORTED_BITS if w > avg_bits]
    if not lower or not upper:
        raise MoescopeError(f"tiers need a width below and above {avg_bits:g} bits (widths {SUPPORTED_BITS})")
    low, high = lower[-1], upper[0]
    flat = np.asarray(importance, dtype=np.float64).ravel()
    top = int((avg_bits - low) / (high - low) * flat.size + 1e-9)
    bits = np.full(flat.size, low)
    bits[np.argsort(-flat, kind="stable")[:top]] = high
    bits = bits.reshape(np.shape(importance))
    indices = sorted(layer.index for layer in find_moe_layers(model))
    layers = {index: [int(b) for b in row] for index, row in zip(indices, bits, strict=True)}
    return BitPlan.made_with(options, layers, model_identity(model), "tiers",
                             {"tiers": {str(high): top, str(low): flat.size - top}, "target_bits": avg_bits})
