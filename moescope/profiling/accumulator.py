"""Fold routing events into a profile's counters on the model's device, one forward call at a time.

The run loop says which phase and which live rows a forward call covers (`begin_call`); the capture
hook hands over events (`on_event`); `end_call` folds the call's events into the counters with one
bincount / index_add per counter, for all layers at once. Weights are added as fixed-point integers
(units of 2^-24), so sums are exact and profiles merge by addition in any order.
"""

from __future__ import annotations

import numpy as np
import torch

from moescope.calibration import Prompt
from moescope.errors import MoescopeError
from moescope.profiling.store import AXES, FIXED_SCALE, HIST_BINS, HIST_EDGES, PHASES, Profile
from moescope.profiling.trace import TraceWriter


class Accumulator:
    """Torch counters for one run, fed one forward call at a time (see the module docstring)."""

    def __init__(self, base: Profile, device, trace: TraceWriter | None = None):
        self.device, self.trace = device, trace
        self.base = base
        self.dense = {name: torch.from_numpy(array.copy()).to(device) for name, array in base.counters.items()
                      if AXES[name][0] != "prompt"}
        self.prompts: list[dict] = list(base.prompts)
        self.per_prompt: dict[str, list[np.ndarray]] = {name: [array] for name, array in base.counters.items()
                                                        if AXES[name][0] == "prompt"}
        self.L, self.E = len(base.layers), base.num_experts
        self.layer_row = {layer["layer"]: i for i, layer in enumerate(base.layers)}
        self.layer_index = [layer["layer"] for layer in base.layers]
        self.edges = torch.tensor(HIST_EDGES, dtype=torch.float32, device=device)
        self.events: list = []

    def begin_batch(self, batch: list[Prompt]) -> None:
        self.batch = batch
        self.row_domain = torch.tensor([self.base.domains.index(p.domain) for p in batch], device=self.device)
        self.row_lang = torch.tensor([self.base.langs.index(p.lang) for p in batch], device=self.device)
        self.presence = torch.zeros(len(PHASES), len(batch), self.L, self.E, dtype=torch.bool, device=self.device)
        self.prompt_tokens = torch.zeros(len(batch), len(PHASES), dtype=torch.long, device=self.device)
        self.prompt_counts = torch.zeros(len(batch), self.L, self.E, dtype=torch.long, device=self.device)

    def begin_call(self, phase: int, offsets, alive=None) -> None:
        """Next forward call: its phase, each row's position offset, and the rows still counted."""
        self.phase, self.offsets, self.alive = phase, offsets, alive

    def on_event(self, event) -> None:
        self.events.append(event)

    def end_call(self, tokens_per_row) -> None:
        """Fold the call's events into the counters; `tokens_per_row` is what the loop fed (no padding)."""
        p, E, L = self.phase, self.E, self.L
        events, self.events = self.events, []
        self._count_tokens(tokens_per_row)
        if not events:
            return

        def cat(field):
            return torch.cat([getattr(e, field).to(self.device) for e in events])

        ids, rows, positions = cat("expert_ids"), cat("rows"), cat("positions")
        weighted = "weight_sum" in self.dense  # absent when the source records ids only (an engine dump)
        weights = cat("weights") if weighted else torch.zeros(ids.shape, device=self.device)
        layer = torch.cat([torch.full((len(e.rows),), self.layer_row[e.layer], device=self.device) for e in events])
        norms = None
        if "saliency_sum" in self.dense:
            if any(e.output_norms is None for e in events):
                raise MoescopeError(f"--saliency is not available for {self.base.model.model_type}: capture "
                                    "cannot measure its experts' outputs per token; profile without it")
            norms = cat("output_norms")
        if self.alive is not None:
            keep = self.alive[rows]
            ids, weights, rows, positions, layer = ids[keep], weights[keep], rows[keep], positions[keep], layer[keep]
            norms = norms[keep] if norms is not None else None
        k = ids.shape[1]
        slot = (layer[:, None] * E + ids).reshape(-1)  # (layer, expert) per selection
        d = self.dense

        def count(group, name, size):  # selections by domain or language
            index = ((group[rows][:, None] * L + layer[:, None]) * E + ids).reshape(-1)
            d[name][p] += torch.bincount(index, minlength=size * L * E).view(size, L, E)

        count(self.row_domain, "selections", len(self.base.domains))
        count(self.row_lang, "lang_selections", len(self.base.langs))
        if weighted:
            self._count_weights(slot, layer, weights, norms)
        per_row = (rows[:, None] * L * E + slot.view(-1, k)).reshape(-1)
        self.presence[p].view(-1)[per_row] = True
        if "prompt_counts" in self.per_prompt:
            self.prompt_counts.view(-1).index_add_(0, per_row, torch.ones_like(per_row))
        if "coactivation" in d:
            pairs = ((layer[:, None, None] * E + ids[:, :, None]) * E + ids[:, None, :]).reshape(-1)
            d["coactivation"][p] += torch.bincount(pairs, minlength=L * E * E).view(L, E, E)
        if self.trace is not None:
            self.trace.add(self.batch, PHASES[p], rows, positions + self.offsets[rows], layer, ids, weights,
                           self.layer_index)

    def _count_weights(self, slot, layer, weights, norms) -> None:
        """The weight counters of one call: sums, squares, histogram, top-k entropy, saliency."""
        p, d, L, E = self.phase, self.dense, self.L, self.E
        w = weights.double().reshape(-1)
        d["weight_sum"][p].view(-1).index_add_(0, slot, fixed(w))
        d["weight_sq"][p].view(-1).index_add_(0, slot, fixed(w * w))
        bins = torch.bucketize(weights.float().reshape(-1), self.edges, right=True)
        d["weight_hist"][p] += torch.bincount(slot * HIST_BINS + bins, minlength=L * E * HIST_BINS).view(
            L, E, HIST_BINS)
        share = weights.double() / weights.double().sum(-1, keepdim=True).clamp_min(1e-30)
        d["entropy_sum"][p].index_add_(0, layer, fixed(-torch.special.xlogy(share, share).sum(-1)))
        if norms is not None:
            d["saliency_sum"][p].view(-1).index_add_(0, slot, fixed(w * norms.double().reshape(-1)))

    def _count_tokens(self, tokens_per_row) -> None:
        p, d = self.phase, self.dense
        d["tokens"][p].index_add_(0, self.row_domain, tokens_per_row)
        d["lang_tokens"][p].index_add_(0, self.row_lang, tokens_per_row)
        self.prompt_tokens[:, p] += tokens_per_row

    def end_batch(self, truncated: list[bool]) -> None:
        presence = self.presence.transpose(0, 1).cpu().numpy()
        self.per_prompt["presence"].append(np.packbits(presence, axis=-1, bitorder="little"))
        self.per_prompt["prompt_tokens"].append(self.prompt_tokens.cpu().numpy())
        if "prompt_counts" in self.per_prompt:  # a prompt picks an expert at most once per token: fits uint32
            self.per_prompt["prompt_counts"].append(self.prompt_counts.cpu().numpy().astype(np.uint32))
        self.prompts += [{"id": p.id, "domain": p.domain, "lang": p.lang, "hash": p.hash, "truncated": t}
                         for p, t in zip(self.batch, truncated, strict=True)]

    def export(self) -> Profile:
        """The counters so far as a (numpy) Profile."""
        profile = Profile(self.base.model, self.base.layers, self.base.settings, self.base.domains,
                          self.base.langs, list(self.prompts), absent=dict(self.base.absent))
        profile.counters = {name: t.cpu().numpy().copy() for name, t in self.dense.items()}
        profile.counters.update({name: np.concatenate(parts) for name, parts in self.per_prompt.items()})
        return profile


def fixed(values):
    """Float64 tensor -> int64 in units of 1/FIXED_SCALE (see profiling.store: exact, mergeable sums)."""
    return (values * FIXED_SCALE).round().long()


