"""Llama-4: top-k of the logits, then an independent sigmoid per chosen expert.

Its experts run densely on every expert's copy of the input scaled by the score (zero for experts
not chosen), so the experts module never sees ids: capture reads the router's output instead.
"""

from __future__ import annotations

import torch

from moescope.models.base import MoELayer, RouterFamily


class TopKSigmoid(RouterFamily):
    name = "topk-sigmoid"
    scores = "sigmoid"
    model_types = {"llama4_text": False, "llama4": False}

    def router_logits(self, router_output) -> torch.Tensor:
        return router_output[1]  # Llama4Router returns (scores, logits)

    def route(self, logits: torch.Tensor, layer: MoELayer, config) -> tuple[torch.Tensor, torch.Tensor]:
        values, ids = logits.float().topk(layer.top_k, dim=-1)
        return ids, values.sigmoid()

    def reroute(self, output, layer: MoELayer, config, offsets: torch.Tensor):
        scores, logits = output
        logits = logits + offsets.to(logits.device)
        ids, weights = self.route(logits, layer, config)
        return torch.zeros_like(scores).scatter_(1, ids, weights.to(scores.dtype)), logits

    def hook_points(self, layer: MoELayer) -> str:
        return "router"
