"""Expert tiers relative to the fair share 1/E, and the bit plan they imply.

An expert's load ratio is its share of its layer's routing score (selections by default) times the
layer's expert count E, so 1.0 is exactly the fair share 1/E. Thresholds on this ratio classify 16-,
128- and 512-expert layers alike; a raw share threshold such as "below 1 %" would call almost every
expert of a 512-expert layer unimportant (the seeds' softmax-dilution lesson).

    tier            load ratio                     default bits
    critical        >= critical  (default 2.0)     8
    standard        >= standard  (default 0.5)     4
    deprioritised   >= prune     (default 0.05)    2
    prune           <  prune                       0 (remove)

A layer always keeps at least top-k experts: if the prune tier would take more, its most-used
experts move up to deprioritised.

Bit plans carry no 0: `moescope quantize` reads 2, 3, 4, 8 or 16 bits. Prune-tier experts are written
at the lowest non-zero tier bits and listed under `source.prune`; `--prune-out` writes them as a prune
plan for `moescope prune`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moescope.analysis.criteria import profile_scores
from moescope.errors import MoescopeError
from moescope.plans import BitPlan, check_bits

TIERS = ("critical", "standard", "deprioritised", "prune")
PADDING = -1  # tier of the unused slots of layers with fewer experts than the widest layer


@dataclass
class TierOptions:
    critical: float = 2.0  # load ratio (multiple of the fair share 1/E) at or above which an expert is critical
    standard: float = 0.5
    prune: float = 0.05
    bits: tuple[int, int, int, int] = (8, 4, 2, 0)  # per tier, in TIERS order
    criterion: str = "frequency"  # score behind the ratio (analysis.criteria)

    def check(self) -> TierOptions:
        """Raise MoescopeError unless 0 <= prune <= standard <= critical and the bits are usable."""
        values = (self.prune, self.standard, self.critical)
        if not all(math.isfinite(v) for v in values) or not 0 <= self.prune <= self.standard <= self.critical:
            raise MoescopeError(f"tier thresholds out of range: need 0 <= prune ({self.prune}) <= standard "
                                f"({self.standard}) <= critical ({self.critical}), in multiples of the fair share 1/E")
        if len(self.bits) != len(TIERS):
            raise MoescopeError(f"give {len(TIERS)} bit widths, one per tier ({', '.join(TIERS)}), not {self.bits}")
        for tier, bits in zip(TIERS[:3], self.bits[:3]):
            check_bits(bits, f"{tier} tier bits")
        if self.bits[3]:
            check_bits(self.bits[3], "prune tier bits")
        return self


def load_ratio(scores: np.ndarray, num_experts: list[int]) -> np.ndarray:
    """[L, E] score share of each expert in its layer times the layer's E (NaN in padding slots)."""
    ratio = np.full(scores.shape, np.nan)
    for row, experts in enumerate(num_experts):
        total = scores[row, :experts].sum()
        ratio[row, :experts] = scores[row, :experts] / total * experts if total > 0 else 0.0
    return ratio


def classify(ratio: np.ndarray, options: TierOptions, top_k: list[int]) -> np.ndarray:
    """int8 [L, E] tier index (into TIERS) per expert; PADDING where the ratio is NaN."""
    options.check()
    tiers = np.select([np.isnan(ratio), ratio >= options.critical, ratio >= options.standard, ratio >= options.prune],
                      [PADDING, 0, 1, 2], 3).astype(np.int8)
    for row, k in enumerate(top_k):
        live = np.flatnonzero(tiers[row] >= 0)
        excess = k - int((tiers[row, live] != 3).sum())
        if excess > 0:  # rescue the most-used prune-tier experts so at least top-k remain
            pruned = live[tiers[row, live] == 3]
            tiers[row, pruned[np.argsort(-ratio[row, pruned], kind="stable")[:excess]]] = 2
    return tiers


def tier_counts(tiers: np.ndarray) -> np.ndarray:
    """int [L, 4]: experts of each tier per layer."""
    return np.stack([(tiers == t).sum(-1) for t in range(len(TIERS))], axis=-1)


def profile_tiers(profile, options: TierOptions) -> np.ndarray:
    """Tiers [L, E] of a profile's experts under `options`."""
    ratio = load_ratio(profile_scores(profile, options.criterion), [x["num_experts"] for x in profile.layers])
    return classify(ratio, options, [x["top_k"] for x in profile.layers])


def tier_bit_plan(profile, options: TierOptions, profile_path: str = "") -> tuple[BitPlan, dict[int, list[int]]]:
    """The bit plan of a profile's tiers, and the prune-tier experts per layer (empty if prune bits are not 0)."""
    tiers = profile_tiers(profile, options)
    floor = min(b for b in options.bits if b)
    bits_of = np.array([b or floor for b in options.bits])
    layers, prune = {}, {}
    for row, layer in enumerate(profile.layers):
        t = tiers[row, : layer["num_experts"]]
        layers[layer["layer"]] = bits_of[t].tolist()
        prune[layer["layer"]] = np.flatnonzero(t == 3).tolist() if options.bits[3] == 0 else []
    counts = tier_counts(tiers)
    source = {"profile": profile_path, "calibration_hash": profile.calibration_hash, "criterion": options.criterion,
              "thresholds": {"critical": options.critical, "standard": options.standard, "prune": options.prune},
              "tier_bits": dict(zip(TIERS, options.bits)), "prune": {str(k): v for k, v in prune.items()},
              "tiers": {str(layer["layer"]): dict(zip(TIERS, map(int, counts[row])))
                        for row, layer in enumerate(profile.layers)}}
    plan = BitPlan(layers, profile.model, "tiers", source=source)
    return plan, prune
