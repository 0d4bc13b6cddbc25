"""Top-k of the logits plus a correction bias, then a sigmoid of the chosen logits (Kolibri-1).

Like DeepSeek-V3 the bias only decides which experts are chosen, but here it is added to the raw
logits rather than to the sigmoid scores, and the weights are the sigmoids of the chosen logits,
optionally renormalised. So neither the top-k of the logits nor of the scores is the selection.
"""

from __future__ import annotations

import torch

from moescope.models.base import MoELayer, RouterFamily, top_k_route


class BiasedTopKSigmoid(RouterFamily):
    name = "biased-topk-sigmoid"
    scores = "sigmoid"
    model_types = {"kolibri1": "config"}

    def probabilities(self, logits: torch.Tensor, layer: MoELayer) -> torch.Tensor:
        """Independent per-expert sigmoid scores (they do not sum to 1)."""
        return logits.float().sigmoid()

    def route(self, logits: torch.Tensor, layer: MoELayer, config) -> tuple[torch.Tensor, torch.Tensor]:
        bias = getattr(layer.router, "e_score_correction_bias", None)
        ids, chosen = top_k_route(logits.float(), layer.top_k, False, blocked=torch.isneginf(logits),
                                  choice_bias=None if bias is None else bias.float())
        weights = chosen.sigmoid()
        if layer.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights
