"""Fold routing events into a profile's counters on the model's device, one forward call at a time.

The run loop says which phase and which live rows a forward call covers (`begin_call`); the capture
hook hands over events (`on_event`); `end_call` stacks the call's events (one op per field, for all
layers at once) and `_fold` adds pending calls into the counters with one index_add per counter.
Weights are added as fixed-point integers (units of 2^-24), so sums are exact and profiles merge by
addition in any order.

Nothing here waits for the device until a batch ends: padding and finished rows are not selected out
(a boolean selection makes the host read its size) but counted with weight 0; counts are index_adds
into counters of known size (a bincount reads the largest index first); the call's layers index a
tensor made once. Decoding steps are folded together once per batch (or when `FOLD_SELECTIONS` are
pending), so a decode step adds a handful of kernels, not one per counter. `end_batch` is the one
place the counters come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moescope.calibration import Prompt
from moescope.errors import MoescopeError
from moescope.profiling.store import AXES, FIXED_SCALE, HIST_BINS, HIST_EDGES, PHASES, Profile
from moescope.profiling.trace import TraceWriter

FOLD_SELECTIONS = 1 << 24  # pending (token, layer, rank) selections that trigger a fold


@dataclass
class Call:
    """One forward call's routing, stacked over its MoE layers (C = calls once several are stacked)."""

    layers: torch.Tensor  # [Lc] counter row of each event's layer
    ids: torch.Tensor  # [C, Lc, n, k] int64
    weights: torch.Tensor | None  # [C, Lc, n, k] float32; None when the profile has no weight counters
    rows: torch.Tensor  # [n] batch row of each token
    valid: torch.Tensor  # [C, n] bool: a real token of a live row
    tokens: torch.Tensor  # [C, B] tokens fed per row (no padding)
    norms: torch.Tensor | None = None  # [C, Lc, n, k] float32
    positions: torch.Tensor | None = None  # [C, n] position of each token in its prompt (for the trace)

    @property
    def shape(self) -> tuple:
        return self.layers.shape + self.ids.shape[2:]


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
        self.pending: list[Call] = []
        self._layer_rows: dict[tuple[int, ...], torch.Tensor] = {}

    def begin_batch(self, batch: list[Prompt]) -> None:
        self.batch = batch
        self.row_domain = self._to_device([self.base.domains.index(p.domain) for p in batch])
        self.row_lang = self._to_device([self.base.langs.index(p.lang) for p in batch])
        # selections per prompt, phase, layer and expert: presence (> 0) and prompt_counts (phases added)
        self.prompt_selections = torch.zeros(len(PHASES), len(batch), self.L, self.E, dtype=torch.long,
                                             device=self.device)
        self.prompt_tokens = torch.zeros(len(batch), len(PHASES), dtype=torch.long, device=self.device)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def begin_call(self, phase: int, offsets, alive=None) -> None:
        """Next forward call: its phase, each row's position offset, and the rows still counted."""
        if self.pending and phase != self.phase:
            self._fold()
        self.phase, self.offsets, self.alive = phase, offsets, alive

    def on_event(self, event) -> None:
        self.events.append(event)

    def end_call(self, tokens_per_row) -> None:
        """Stack the call's events; fold them (with earlier pending calls) when enough are pending.
        `tokens_per_row` is what the loop fed (no padding)."""
        events, self.events = self.events, []
        if not events:
            self._count_tokens(tokens_per_row)
            return
        call = self._stack(events, tokens_per_row)
        if self.pending and (self.pending[0].layers is not call.layers or self.pending[0].shape != call.shape):
            self._fold()  # pending calls are stacked: the same layers (one cached tensor per set) and shape
        self.pending.append(call)
        if self.trace is not None or sum(c.ids.numel() for c in self.pending) >= FOLD_SELECTIONS:
            self._fold()

    def _here(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the accumulator's device (events of a model split across devices come from several)."""
        return tensor if tensor.device == self.device else tensor.to(self.device, non_blocking=True)

    def _stack(self, events: list, tokens_per_row) -> Call:
        key = tuple(e.layer for e in events)
        if key not in self._layer_rows:  # made once: a tensor from host values is copied to the device
            self._layer_rows[key] = self._to_device([self.layer_row[layer] for layer in key])
        first = events[0]
        rows = self._here(first.call_rows)
        valid = self._here(first.keep) if first.keep is not None else torch.ones_like(rows, dtype=torch.bool)
        if self.alive is not None:
            valid = valid & self.alive[rows]
        norms = None
        if "saliency_sum" in self.dense:
            if any(e.call_norms is None for e in events):
                raise MoescopeError(f"--saliency is not available for {self.base.model.model_type}: capture "
                                    "cannot measure its experts' outputs per token; profile without it")
            norms = torch.stack([self._here(e.call_norms) for e in events])[None]
        positions = (self._here(first.call_positions) + self.offsets[rows])[None] if self.trace else None
        weights = None if "weight_sum" not in self.dense else \
            torch.stack([self._here(e.call_weights) for e in events]).float()[None]
        return Call(self._layer_rows[key], torch.stack([self._here(e.call_ids) for e in events]).long()[None],
                    weights, rows, valid[None], tokens_per_row[None], norms, positions)

    def _fold(self) -> None:
        """Add the pending calls (same phase and shape) into the counters, all at once."""
        calls, self.pending = self.pending, []
        if len(calls) == 1:
            call = calls[0]
        else:
            def cat(name):
                return torch.cat([getattr(c, name) for c in calls])
            first = calls[0]
            call = Call(first.layers, cat("ids"), cat("weights") if first.weights is not None else None, first.rows,
                        cat("valid"), cat("tokens"), cat("norms") if first.norms is not None else None)
        self._count_tokens(call.tokens.sum(0))
        self._count_selections(call)

    def _count_selections(self, call: Call) -> None:
        p, E, L, d = self.phase, self.E, self.L, self.dense
        C, Lc, n, k = call.ids.shape
        ids = call.ids
        layer = call.layers.view(1, Lc, 1, 1).expand(C, Lc, n, k)
        rows = call.rows.view(1, 1, n, 1).expand(C, Lc, n, k)
        valid = call.valid.view(C, 1, n, 1).expand(C, Lc, n, k).reshape(-1)
        ones = valid.long()
        slot = (layer * E + ids).reshape(-1)  # (layer, expert) of each selection

        for group, name in ((self.row_domain, "selections"), (self.row_lang, "lang_selections")):
            d[name][p].view(-1).index_add_(0, ((group[rows] * L + layer) * E + ids).reshape(-1), ones)
        if call.weights is not None:  # an engine dump records ids only: its profile lacks the weight counters
            self._count_weights(call, slot, ones)
        self.prompt_selections[p].view(-1).index_add_(0, (rows * L * E).reshape(-1) + slot, ones)
        if "coactivation" in d:
            pairs = ((layer[..., None] * E + ids[..., None]) * E + ids[..., None, :]).reshape(-1)
            d["coactivation"][p].view(-1).index_add_(0, pairs, valid.view(-1, k, 1).expand(-1, k, k).reshape(-1)
                                                     .long())
        if self.trace is not None:
            self._trace(call)

    def _count_weights(self, call: Call, slot: torch.Tensor, ones: torch.Tensor) -> None:
        """The weight counters of one stacked call: sums, squares, histogram, top-k entropy, saliency."""
        p, d = self.phase, self.dense
        C, _, n, _ = call.ids.shape
        weights = torch.where(call.valid.view(C, 1, n, 1), call.weights, 0.0)  # padding may hold NaN
        w = weights.double().reshape(-1)
        d["weight_sum"][p].view(-1).index_add_(0, slot, fixed(w))
        d["weight_sq"][p].view(-1).index_add_(0, slot, fixed(w * w))
        bins = torch.bucketize(weights.reshape(-1), self.edges, right=True)
        d["weight_hist"][p].view(-1).index_add_(0, slot * HIST_BINS + bins, ones)
        share = weights.double() / weights.double().sum(-1, keepdim=True).clamp_min(1e-30)
        entropy = fixed(-torch.special.xlogy(share, share).sum(-1)).sum((0, 2))  # [Lc]: rounded per token
        d["entropy_sum"][p].index_add_(0, call.layers, entropy)
        if call.norms is not None:
            norms = torch.where(call.valid.view(C, 1, n, 1), call.norms, 0.0).double().reshape(-1)
            d["saliency_sum"][p].view(-1).index_add_(0, slot, fixed(w * norms))

    def _trace(self, call: Call) -> None:
        """Every real (token, layer, rank) record of one call to the trace (host-bound by nature)."""
        _, Lc, n, k = call.ids.shape
        keep = call.valid[0].repeat(Lc)
        rows, positions = call.rows.repeat(Lc)[keep], call.positions[0].repeat(Lc)[keep]
        layer = call.layers.repeat_interleave(n)[keep]
        self.trace.add(self.batch, PHASES[self.phase], rows, positions, layer, call.ids[0].reshape(-1, k)[keep],
                       call.weights[0].reshape(-1, k)[keep], self.layer_index)

    def _count_tokens(self, tokens_per_row) -> None:
        p, d = self.phase, self.dense
        d["tokens"][p].index_add_(0, self.row_domain, tokens_per_row)
        d["lang_tokens"][p].index_add_(0, self.row_lang, tokens_per_row)
        self.prompt_tokens[:, p] += tokens_per_row

    def end_batch(self, truncated: list[bool]) -> None:
        if self.pending:
            self._fold()
        presence = (self.prompt_selections > 0).transpose(0, 1).cpu().numpy()
        self.per_prompt["presence"].append(np.packbits(presence, axis=-1, bitorder="little"))
        self.per_prompt["prompt_tokens"].append(self.prompt_tokens.cpu().numpy())
        if "prompt_counts" in self.per_prompt:  # a prompt picks an expert at most once per token: fits uint32
            counts = self.prompt_selections.sum(0)
            self.per_prompt["prompt_counts"].append(counts.cpu().numpy().astype(np.uint32))
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


