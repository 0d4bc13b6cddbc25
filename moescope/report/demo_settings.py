"""The demo's settings (full and `--quick`) and the small pieces its stages share: which prompts, which
evaluation protocol, and the findings.json form of per-window NLLs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moescope.backends.hf.loading import Placement
from moescope.calibration import load_calibration
from moescope.compress.repair import REPAIR_STEPS
from moescope.judge.evaluate import Protocol


@dataclass
class DemoSettings:
    quick: bool = False
    generate: int = 8  # generated tokens profiled per prompt
    prompts: int | None = None  # calibration prompts per set (None: all)
    ratios: tuple[float, ...] = (0.05, 0.1, 0.25)
    criteria: tuple[str, ...] = ("frequency", "gate-mass", "saliency")
    seq_len: int = 256
    sequences: int = 16  # held-out windows per domain and language
    probes: int | None = None
    max_new_tokens: int = 48
    bad_ratio: float = 0.25
    items: int | None = None  # labelled multiple-choice items for per-expert accuracy (None: all)
    merge_ratios: tuple[float, ...] = (0.1, 0.25)  # shares of experts fewer, removal vs merging
    merge_methods: tuple[str, ...] = ("hc-smoe", "m-smoe")
    merge_criterion: str = "saliency"  # removal's criterion against merging: REAP's, whose authors favour removal
    calibration_prompts: int = 128  # prompts merged router rows are fitted on and repaired routers matched on
    repair_steps: int = REPAIR_STEPS
    # float32 by default: the demo model is trained in float32, and bf16 matmuls are slower on CPU
    placement: Placement = field(default_factory=lambda: Placement(dtype="float32"))

    @classmethod
    def make(cls, quick: bool, placement: Placement | None = None) -> DemoSettings:
        where = {"placement": placement} if placement else {}
        if not quick:
            return cls(**where)
        return cls(quick=True, generate=2, prompts=36, ratios=(0.1, 0.25), criteria=("frequency", "gate-mass"),
                   seq_len=128, sequences=2, probes=12, max_new_tokens=12, items=40, merge_methods=("hc-smoe",),
                   calibration_prompts=16, repair_steps=20, **where)


def load_prompts(path: Path, limit: int | None):
    """The first `limit` prompts of each domain (all when None), in file order."""

    prompts = load_calibration(path)
    if limit is None:
        return prompts
    per_domain = max(1, limit // len({p.domain for p in prompts}))
    seen: dict[str, int] = {}
    kept = []
    for prompt in prompts:
        seen[prompt.domain] = seen.get(prompt.domain, 0) + 1
        if seen[prompt.domain] <= per_domain:
            kept.append(prompt)
    return kept


def curve_at(curve: dict, prompts: int) -> dict:
    """Dead experts (all layers) on the sample-size curve at the first point with >= `prompts` prompts:
    the mean over prompt orderings and its 95 % band."""
    at = next((i for i, n in enumerate(curve["n"]) if n >= prompts), len(curve["n"]) - 1)
    return {"n": int(curve["n"][at]), "mean": float(curve["dead_mean"][at]), "lo": float(curve["dead_lo"][at]),
            "hi": float(curve["dead_hi"][at])}


def window_means(per_window: dict) -> dict:
    """findings.json form of (plan, ratio) -> (domain, lang) -> per-window mean NLLs: "plan@ratio" (or "plan"
    where ratio is None) -> "domain/lang"."""
    return {name if name == "none" or ratio is None else f"{name}@{ratio:g}":
            {f"{d}/{g}": [float(v) for v in values] for (d, g), values in groups.items()}
            for (name, ratio), groups in per_window.items()}


def by_criterion(per_window: dict) -> dict:
    """A removal sweep's per-window NLLs keyed by criterion ("frequency") rather than variant ("remove frequency")."""
    return {(variant.removeprefix("remove "), ratio): groups for (variant, ratio), groups in per_window.items()}


def protocol(settings: DemoSettings):
    return Protocol(seq_len=settings.seq_len, sequences=settings.sequences, placement=settings.placement)
