"""PhiMoE's sparsemixer: experts chosen one rank at a time, each weight a softmax over the experts
whose logits lie within a relative margin of the best remaining one.

In eval mode it is deterministic, so it can be re-run on masked logits; it defines no single
distribution over all experts.
"""

from __future__ import annotations

import torch

from moescope.models.base import MoELayer, RouterFamily


class SparseMixer(RouterFamily):
    name = "sparsemixer"
    scores = "softmax"
    model_types = {"phimoe": False}

    def route(self, logits: torch.Tensor, layer: MoELayer, config) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        eps = getattr(layer.router, "router_jitter_noise", 0.01)
        weights, ids = sparsemixer(logits.float(), jitter_eps=eps, training=False, top_k=layer.top_k)
        return ids, weights
