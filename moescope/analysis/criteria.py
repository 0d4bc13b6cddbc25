"""The importance criteria a profile can score experts by, each defined once.

A criterion reads one profile counter, summed over phases (and domains): its total per expert, or
its mean per selection (per routed token). Pruning ranks experts by a criterion, tiers classify them
by their share of it, and budget allocation weighs each expert's quantisation error by it. Measured
criteria that need the model itself (ablation for pruning, Fisher for quantisation) live with the
compression that measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moescope.errors import MoescopeError


@dataclass(frozen=True)
class Criterion:
    name: str
    counter: str  # the profile counter it reads
    per_selection: bool  # mean per routed token instead of the total
    flag: str  # the `moescope profile` flag that records the counter ("" when always recorded)
    description: str


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("frequency", "selections", False, "", "how often the expert was chosen (the seeds' criterion; a poor "
              "proxy for importance)"),
    Criterion("gate-mass", "weight_sum", False, "", "the sum of the routing weights it received"),
    Criterion("gate-energy", "weight_sq", False, "", "the sum of their squares, which scales the error an expert "
              "adds to the residual stream"),
    Criterion("saliency", "saliency_sum", True, "--saliency", "REAP: the mean over the tokens routed to it of "
              "weight x L2 norm of its output"),
    Criterion("saliency-mass", "saliency_sum", False, "--saliency", "the sum over tokens of weight x L2 norm of its "
              "output (REAP's saliency times its frequency)"),
)}


def criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise MoescopeError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


def profile_scores(profile, name: str) -> np.ndarray:
    """Importance [L, E] of every expert under criterion `name`, from a profile's counters."""
    chosen = criterion(name)
    if chosen.counter in profile.absent:
        raise MoescopeError(f"{profile.lacks(chosen.counter, f'criterion {name}')}; choose --criterion frequency")
    if chosen.counter not in profile.counters:
        raise MoescopeError(f"this profile has no {chosen.counter} counters for criterion {name}: profile again "
                            f"with {chosen.flag}")
    selections = profile.counters["selections"].sum(axis=(0, 1)).astype(np.float64)
    if chosen.counter == "selections":
        return selections
    total = profile.real(chosen.counter).sum(0)
    if not chosen.per_selection:
        return total
    return np.divide(total, selections, out=np.zeros_like(selections), where=selections > 0)
