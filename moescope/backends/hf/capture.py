"""Record the routing each MoE layer's experts actually consumed.

    with capture_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    rec.events  # one RoutingEvent per MoE layer call

A forward pre-hook on each `experts` module sees the exact (ids, weights) the experts were called
with, whatever kernel runs them; families whose experts never see ids (Llama-4) are read from the
router's output instead. Router logits (`output_router_logits`) are not a safe source: for
sigmoid-plus-bias routers their top-k is not the selection.

Padding is told apart with the attention mask passed to the model's forward: a call of n tokens on
a batch of B rows covers the last n / B columns of the mask (prefill: all of them; a decode step:
the newest one). Events keep every token and mark the real ones (`keep`); their properties drop the
rest. Nothing a hook does per layer call waits for the device (no `.item()`, no boolean selection,
whose size the host must read), so capture never stalls a GPU; the token layout is built once per
forward call, and saliency costs one extra experts call per layer call.

With `router_io`, each event also carries what the router saw and said: the hidden states the
experts were called with (the router's input in every supported architecture; the router refit
checks that its logits are a linear map of them) and the raw logits. Merging and router repair
are built on these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from moescope.models.base import MoELayer
from moescope.models.layout import text_config
from moescope.models.registry import find_moe_layers


@dataclass
class RoutingEvent:
    """One MoE layer call. The `call_*` tensors cover every token of the call, padding included, as
    the experts got them: capture never waits for the device (selecting the real tokens would).
    `keep` [n] marks the real tokens (None: all are). The properties give the real tokens only,
    ids as int64 and weights as float32; reading one waits for the device."""

    layer: int  # decoder layer index (MoELayer.index)
    call_ids: torch.Tensor  # [n, k]
    call_weights: torch.Tensor | None  # [n, k], the model's dtype; None where the source records ids only (dumps)
    call_rows: torch.Tensor  # [n] batch row of each token
    call_positions: torch.Tensor  # [n] column of each token within this forward call
    keep: torch.Tensor | None = None  # [n] bool
    call_probs: torch.Tensor | None = None  # [n, E] full router distribution, where the family has one
    call_norms: torch.Tensor | None = None  # [n, k] float32 L2 norm of each chosen expert's output
    call_inputs: torch.Tensor | None = None  # [n, H] hidden states the experts (and the router) received
    call_logits: torch.Tensor | None = None  # [n, E] raw router logits

    def _kept(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor if tensor is None or self.keep is None else tensor[self.keep]

    @cached_property
    def expert_ids(self) -> torch.Tensor:
        return self._kept(self.call_ids.long())

    @cached_property
    def weights(self) -> torch.Tensor | None:
        return None if self.call_weights is None else self._kept(self.call_weights.float())

    @cached_property
    def rows(self) -> torch.Tensor:
        return self._kept(self.call_rows)

    @cached_property
    def positions(self) -> torch.Tensor:
        return self._kept(self.call_positions)

    @cached_property
    def probs(self) -> torch.Tensor | None:
        return self._kept(self.call_probs)

    @cached_property
    def output_norms(self) -> torch.Tensor | None:
        return self._kept(self.call_norms)

    @cached_property
    def inputs(self) -> torch.Tensor | None:
        return self._kept(self.call_inputs)

    @cached_property
    def logits(self) -> torch.Tensor | None:
        return self._kept(self.call_logits)


class RoutingRecorder:
    """Collects events (or hands each to `on_event`) while `capture_routing` is active."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], distributions: bool, saliency: bool,
                 on_event: Callable[[RoutingEvent], None] | None, router_io: bool = False):
        self.layers = layers
        self.distributions = distributions
        self.router_io = router_io
        self.saliency = saliency
        self.on_event = on_event
        self.events: list[RoutingEvent] = []
        self._mask: torch.Tensor | None = None  # [B, S] attention mask of the current forward call
        self._batch = 1
        self._layouts: dict = {}  # (tokens, device) -> token layout, for the current forward call
        self._recomputing = False  # True while saliency re-runs experts: those calls are ours
        self._logits: dict[int, torch.Tensor] = {}
        self._config = text_config(model.config)

    def clear(self) -> None:
        self.events.clear()

    def _on_model_call(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        shaped = ids if ids is not None else embeds
        self._batch = shaped.shape[0] if shaped is not None else 1
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._layouts = {}

    def _token_layout(self, tokens: int, device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(keep mask or None, rows, positions) for a call that flattened `tokens` tokens; made once per
        forward call and device, as every MoE layer of the call sees the same tokens."""
        key = (tokens, device)
        if key not in self._layouts:
            batch = self._batch if tokens % self._batch == 0 else 1
            columns = tokens // batch
            rows = torch.arange(batch, device=device)[:, None].expand(batch, columns).reshape(-1)
            positions = torch.arange(columns, device=device).repeat(batch)
            keep = None
            if self._mask is not None and self._mask.shape[0] == batch and self._mask.shape[1] >= columns:
                keep = self._mask[:, -columns:].reshape(-1).to(device=device, dtype=torch.bool)
            self._layouts[key] = keep, rows, positions
        return self._layouts[key]

    def _emit(self, layer: MoELayer, ids: torch.Tensor, weights: torch.Tensor, hidden: torch.Tensor | None):
        tokens = ids.numel() // ids.shape[-1]
        keep, rows, positions = self._token_layout(tokens, ids.device)
        logits = self._logits.pop(layer.path, None)
        probs = layer.family.probabilities(logits, layer) if self.distributions and logits is not None else None
        inputs = hidden.reshape(tokens, -1) if self.router_io and hidden is not None else None
        logits = logits.reshape(tokens, -1) if self.router_io and logits is not None else None
        event = RoutingEvent(layer.index, ids.reshape(tokens, -1), weights.reshape(tokens, -1), rows, positions,
                             keep, probs, call_inputs=inputs, call_logits=logits)
        if self.saliency and hidden is not None:
            event.call_norms = self._expert_output_norms(layer, hidden, event.call_ids)
        if self.on_event is not None:
            self.on_event(event)
        else:
            self.events.append(event)

    @torch.no_grad()
    def _expert_output_norms(self, layer: MoELayer, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """||f_e(h)|| for each token and each of its k chosen experts e, [n, k] float32: one extra call of the
        experts module (each token repeated k times, one expert each, weight 1)."""
        self._recomputing = True
        try:
            outputs = each_expert_output(layer, hidden.reshape(-1, hidden.shape[-1]), ids)
        finally:
            self._recomputing = False
        return outputs.float().norm(dim=-1)

    def _attach(self, layer: MoELayer) -> list:
        handles = []
        if layer.family.hook_points(layer) == "router":

            def router_hook(module, args, output):
                logits = layer.family.router_logits(output)
                if self.distributions:
                    self._logits[layer.path] = logits
                ids, weights = layer.family.route(logits, layer, self._config)
                self._emit(layer, ids, weights, None)

            handles.append(layer.router.register_forward_hook(router_hook))
            return handles

        if self.distributions or self.router_io:

            def logits_hook(module, args, output):
                self._logits[layer.path] = layer.family.router_logits(output)

            handles.append(layer.router.register_forward_hook(logits_hook))

        def experts_hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            if ids is None or weights is None or self._recomputing:
                return
            self._emit(layer, ids, weights, hidden)

        handles.append(layer.experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
        return handles


def run_experts(layer: MoELayer, hidden: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Each expert's output at weight 1: row i of `hidden` [n, H] through expert `expert_ids[i, 0]`,
    by calling the layer's own experts module (so every kernel and layout is served)."""
    ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    return layer.experts(hidden, expert_ids.to(hidden.device), ones)


@contextmanager
def capture_routing(
    model: nn.Module,
    *,
    distributions: bool = False,
    saliency: bool = False,
    on_event: Callable[[RoutingEvent], None] | None = None,
    router_io: bool = False,
) -> Iterator[RoutingRecorder]:
    """Record routing for every forward call inside the block; hooks are removed on exit, always.

    distributions: also keep the full router distribution [n, E] (costs memory; None where the
        family defines none, e.g. top-k-then-softmax routers).
    saliency: also record the L2 norm of each chosen expert's output (REAP); costs one extra pass of
        the experts per layer call.
    on_event: hand each event to this callback instead of keeping it (bounded memory).
    router_io: also keep each layer's input hidden states [n, H] and raw router logits [n, E]
        (`inputs`, `logits`); costs memory, for merging and router repair.
    """
    layers = find_moe_layers(model)
    recorder = RoutingRecorder(model, layers, distributions, saliency, on_event, router_io)
    handles = [model.register_forward_pre_hook(recorder._on_model_call, with_kwargs=True)]
    try:
        for layer in layers:
            handles.extend(recorder._attach(layer))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def each_expert_output(layer: MoELayer, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """f_e(hidden[t]) for every token t and each of its chosen experts e = ids[t, r], [n, k, H]: the
    experts module called once on the tokens repeated k times, one expert each, at weight 1."""
    tokens, k = ids.shape
    repeated = hidden[:, None].expand(tokens, k, hidden.shape[-1]).reshape(tokens * k, -1)
    return run_experts(layer, repeated, ids.reshape(-1, 1)).view(tokens, k, -1)
