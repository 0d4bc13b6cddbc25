"""Profiles from parsed dumps: per-request expert ids through the profiler's own accumulator, or
summed counts straight into the selection counters.

Expert ids go through `Accumulator` exactly as captured routing does, so selections, tokens,
presence, per-prompt counts and co-activation mean the same in an ingested profile as in a
measured one. What a dump cannot give is left out and named in `Profile.absent`.
"""

from __future__ import annotations

import numpy as np
import torch

from moescope.backends.hf.capture import RoutingEvent
from moescope.calibration import Prompt
from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity
from moescope.profiling.accumulator import Accumulator
from moescope.profiling.ingest.base import ModelShape, Request
from moescope.profiling.store import PHASES, Profile

WEIGHT_COUNTERS = ("weight_sum", "weight_sq", "weight_hist", "entropy_sum")
REQUESTS_PER_BATCH = 64


def profile_from_requests(requests: list[Request], prompts: list[Prompt], shape: ModelShape,
                          model: ModelIdentity, layers: list[dict], settings: dict, coactivation: bool) -> Profile:
    """Fold every request (tagged as `prompts`, in the same order) into a profile."""
    why = f"{settings['source']} dumps record expert ids, not routing weights"
    domains, langs = sorted({p.domain for p in prompts}), sorted({p.lang for p in prompts})
    base = Profile.empty(model, layers, settings, domains, langs, coactivation=coactivation, prompt_counts=True,
                         absent=dict.fromkeys(WEIGHT_COUNTERS, why))
    acc = Accumulator(base, torch.device("cpu"))
    for start in range(0, len(requests), REQUESTS_PER_BATCH):
        group = requests[start : start + REQUESTS_PER_BATCH]
        acc.begin_batch(prompts[start : start + REQUESTS_PER_BATCH])
        for phase, part in enumerate(("prefill", "generation")):
            arrays = [getattr(r, part) for r in group]
            lengths = torch.tensor([len(a) for a in arrays])
            acc.begin_call(phase, torch.zeros(len(group), dtype=torch.long))
            ids = torch.from_numpy(np.concatenate(arrays)) if lengths.sum() else None
            rows = torch.repeat_interleave(torch.arange(len(group)), lengths)
            for column, layer in enumerate(shape.moe_layers):
                if ids is not None:
                    acc.on_event(RoutingEvent(layer, ids[:, column], None, rows, torch.zeros_like(rows)))
            acc.end_call(lengths)
        acc.end_batch([False] * len(group))
    return acc.export()


def profile_from_counts(counts: np.ndarray, domain: str, lang: str, shape: ModelShape, model: ModelIdentity,
                        layers: list[dict], settings: dict) -> Profile:
    """A profile of summed selection counts [MoE layers, experts]: no prompts, no phases, no weights. The
    tokens are the selections of a layer over top-k, which must agree across layers."""
    source = settings["source"]
    absent = dict.fromkeys(WEIGHT_COUNTERS, f"{source} dumps count selections, not routing weights")
    absent["prompt_counts"] = f"{source} dumps sum over requests; there is no per-request detail"
    profile = Profile.empty(model, layers, settings, [domain], [lang], absent=absent)
    per_layer = counts.sum(1)
    tokens, remainder = divmod(int(per_layer[0]), shape.top_k)
    if remainder or (per_layer != per_layer[0]).any():
        raise MoescopeError(f"the counts are not whole tokens: MoE layers hold {sorted(set(per_layer.tolist()))} "
                            f"selections (each token makes top-k {shape.top_k} in every MoE layer); the dumps are "
                            "incomplete or from different runs")
    prefill = PHASES.index("prefill")
    profile.counters["selections"][prefill, 0] = counts
    profile.counters["lang_selections"][prefill, 0] = counts
    profile.counters["tokens"][prefill, 0] = tokens
    profile.counters["lang_tokens"][prefill, 0] = tokens
    return profile
