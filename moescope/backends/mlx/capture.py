"""Record the routing every mlx-lm MoE block applied, as the same `RoutingEvent`s the torch capture gives.

    with capture_mlx_routing(model) as rec:     # model: an MlxCausalLM
        model(input_ids=ids, attention_mask=mask)
    rec.events  # one RoutingEvent per MoE layer call, torch tensors (padding marked by `keep`, as torch's)

Every mlx-lm MoE block calls its experts as `switch(x, indices)` (a SwitchGLU or SwitchMLP) and then
multiplies their outputs by the routing weights (`y * scores[..., None]`). While capturing, each
switch instance's class is swapped for a subclass (parameters and key names unchanged; swapped back
on exit, also after an exception) that records `indices` and returns its output as `_Routed`, an
mx.array whose `*` records the other operand: exactly the weights that multiplied the expert
outputs, whatever arithmetic the family used to compute them. Families that scale the experts'
input instead (Llama-4) have their router recorded too, and the weights recomputed with the
family's own ops (`INPUT_SCALED`). A block that never multiplies its experts' output is an error,
not a guess.

Nothing is evaluated during the forward pass: the model wrapper evaluates the logits and everything
recorded in one `mx.eval`, then converts. mlx-lm picks the top-k with argpartition, so the ids of a
token come in no particular order; each token's experts are sorted by weight, highest first.
With `saliency`, the norm of each chosen expert's output (before weighting) comes free with the call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from moescope.backends.hf.capture import RoutingEvent
from moescope.backends.mlx.model import MlxCausalLM, SwitchBlock, TokenLayout, to_torch
from moescope.errors import MoescopeError
from moescope.models.base import MoELayer


def _sigmoid_of_chosen(logits, indices, dtype):
    """mlx_lm.models.llama4.MoE: the sigmoid of the chosen logits, in float32, cast to the input's dtype."""
    chosen = mx.take_along_axis(logits, indices, axis=-1)
    return mx.sigmoid(chosen.astype(mx.float32)).astype(dtype)


# Block class (module.qualname) -> weights from (router logits, ids, input dtype), for families that
# scale the experts' input by the routing weights instead of their output.
INPUT_SCALED: dict[str, Callable] = {"mlx_lm.models.llama4.MoE": _sigmoid_of_chosen}


@dataclass
class _Call:
    """One switch call's routing, still lazy mlx arrays."""

    layer: int
    ids: Any
    weights: Any = None
    norms: Any = None


class _Routed(mx.array):
    """The experts' output [..., k, D]; records what it is multiplied by (the routing weights)."""

    def __mul__(self, other):
        self._call.weights = _weights_of(other, self._ids_shape)
        return self._plain * other

    def __rmul__(self, other):
        self._call.weights = _weights_of(other, self._ids_shape)
        return other * self._plain


def _weights_of(factor, ids_shape: tuple) -> Any:
    """The per-(token, expert) weights in a factor that multiplies [..., k, D] outputs."""
    factor = factor if isinstance(factor, mx.array) else mx.array(factor)
    return mx.broadcast_to(factor, (*ids_shape, 1))[..., 0] if factor.ndim else mx.full(ids_shape, factor)


class MlxRoutingRecorder:
    """Collects events (or hands each to `on_event`) while `capture_mlx_routing` is active."""

    def __init__(self, layers: list[MoELayer], saliency: bool, on_event: Callable[[RoutingEvent], None] | None):
        self.layers = layers
        self.saliency = saliency
        self.on_event = on_event
        self.events: list[RoutingEvent] = []
        self._calls: list[_Call] = []
        self._layout: TokenLayout | None = None
        self._router_logits: dict[int, Any] = {}

    def clear(self) -> None:
        self.events.clear()

    # --- called by MlxCausalLM around each forward call
    def begin_call(self, layout: TokenLayout) -> None:
        self._layout, self._calls = layout, []

    def arrays(self) -> list:
        """What `end_call` reads, to be evaluated together with the logits."""
        missing = sorted({c.layer for c in self._calls if c.weights is None})
        if missing:
            raise MoescopeError(f"layers {missing}: the MoE block never multiplied its experts' output by routing "
                                "weights, so capture cannot see them; this mlx-lm family needs an INPUT_SCALED entry")
        return [a for c in self._calls for a in (c.ids, c.weights, c.norms) if a is not None]

    def end_call(self) -> None:
        for call in self._calls:
            self._emit(call)
        self._calls = []

    def _emit(self, call: _Call) -> None:
        k = call.ids.shape[-1]
        ids = to_torch(call.ids).reshape(-1, k).long()
        weights = to_torch(call.weights).reshape(ids.shape).float()
        norms = to_torch(call.norms).reshape(ids.shape).float() if call.norms is not None else None
        layout = self._layout
        if ids.shape[0] != layout.tokens:
            raise MoescopeError(f"layer {call.layer}: the experts saw {ids.shape[0]} tokens in a call of "
                                f"{layout.tokens}; capture cannot place them")
        by_id = ids.sort(dim=-1, stable=True).indices  # ties of weight: lower id first
        order = by_id.gather(1, weights.gather(1, by_id).sort(dim=-1, descending=True, stable=True).indices)
        ids, weights = ids.gather(1, order), weights.gather(1, order)
        norms = norms.gather(1, order) if norms is not None else None
        event = RoutingEvent(call.layer, ids, weights, layout.rows, layout.positions, layout.keep, None, norms)
        if self.on_event is not None:
            self.on_event(event)
        else:
            self.events.append(event)

    # --- the class swaps
    def switch_class(self, cls: type, block: SwitchBlock, scaled: Callable | None) -> type:
        recorder = self

        class RecordingSwitch(cls):
            def __call__(self, x, indices, *args, **kwargs):
                out = super().__call__(x, indices, *args, **kwargs)
                call = _Call(block.index, indices)
                recorder._calls.append(call)
                if scaled is not None:  # the input was scaled: the saliency norm would be of f(w * x)
                    call.weights = scaled(recorder._router_logits.pop(block.index), indices, x.dtype)
                    return out
                if recorder.saliency:
                    call.norms = mx.linalg.norm(out.astype(mx.float32), axis=-1)
                routed = _Routed(out)
                routed._plain, routed._call, routed._ids_shape = out, call, tuple(indices.shape)
                return routed

        RecordingSwitch.__name__ = f"Recording{cls.__name__}"
        return RecordingSwitch

    def router_class(self, cls: type, block: SwitchBlock) -> type:
        recorder = self

        class RecordingRouter(cls):
            def __call__(self, x, *args, **kwargs):
                logits = super().__call__(x, *args, **kwargs)
                recorder._router_logits[block.index] = logits
                return logits

        RecordingRouter.__name__ = f"Recording{cls.__name__}"
        return RecordingRouter


@contextmanager
def capture_mlx_routing(model: MlxCausalLM, *, distributions: bool = False, saliency: bool = False,
                        on_event: Callable[[RoutingEvent], None] | None = None) -> Iterator[MlxRoutingRecorder]:
    """Record routing for every forward call of `model` inside the block (see the module docstring)."""
    if distributions:
        raise MoescopeError("the MLX backend records the chosen experts and their weights, not the full router "
                            "distribution; use --backend hf for that")
    recorder = MlxRoutingRecorder(model.moe_layers, saliency, on_event)
    swapped: list[tuple[Any, type]] = []

    def swap(module, make: Callable[[type], type]) -> None:
        swapped.append((module, type(module)))
        module.__class__ = make(type(module))

    try:
        for block in model.blocks:
            scaled = INPUT_SCALED.get(f"{type(block.block).__module__}.{type(block.block).__qualname__}")
            swap(block.switch, lambda cls, b=block, s=scaled: recorder.switch_class(cls, b, s))
            if scaled is not None:
                if block.router is None:
                    raise MoescopeError(f"{block.path}: the family scales its experts' input but has no router "
                                        "module to read the weights from")
                swap(block.router, lambda cls, b=block: recorder.router_class(cls, b))
        model.recorders.append(recorder)
        yield recorder
    finally:
        if recorder in model.recorders:
            model.recorders.remove(recorder)
        for module, cls in reversed(swapped):
            module.__class__ = cls
