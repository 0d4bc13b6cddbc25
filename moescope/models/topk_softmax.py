"""Top-k of the logits first, then a softmax over the k chosen (gpt-oss with a router bias, Granite-MoE).

The weights are renormalised by construction, and the family defines no distribution over all
experts: the softmax only ever sees the k chosen logits.
"""

from __future__ import annotations

import torch

from moescope.models.base import MoELayer, RouterFamily


class TopKSoftmax(RouterFamily):
    name = "topk-softmax"
    scores = "softmax"
    model_types = {"gpt_oss": True, "granitemoe": True, "granitemoeshared": True, "granitemoe_swa": True}

    def removal_equals_mask(self, layer: MoELayer, config) -> bool:
        return True

    def route(self, logits: torch.Tensor, layer: MoELayer, config) -> tuple[torch.Tensor, torch.Tensor]:
        values, ids = logits.float().topk(layer.top_k, dim=-1)
        return ids, values.softmax(-1)
