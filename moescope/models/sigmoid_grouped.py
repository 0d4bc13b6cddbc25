"""Sigmoid scores plus a correction bias, group-limited top-k (DeepSeek-V3 family, GLM-4-MoE, ...).

The bias decides which experts are chosen but the weights are the unbiased sigmoid scores,
optionally renormalised and multiplied by `routed_scaling_factor`. Because of the bias, the top-k
of the raw logits is not the selection: capture must never be read from router logits.
"""

from __future__ import annotations

import torch

from moescope.models.base import MoELayer, RouterFamily, option, top_k_route


class SigmoidGrouped(RouterFamily):
    name = "sigmoid-grouped"
    scores = "sigmoid"
    model_types = {
        "deepseek_v3": "config",
        "glm4_moe": "config",
        "dots1": "config",
        "exaone_moe": "config",
        "glm4_moe_lite": "config",
        "afmoe": True,
        "laguna": True,
        "mimo_v2_flash": "config",
        "solar_open": "config",
        "minimax_m2": True,
        "hy_v3": True,
    }

    def probabilities(self, logits: torch.Tensor, layer: MoELayer) -> torch.Tensor:
        """Independent per-expert sigmoid scores (they do not sum to 1)."""
        return logits.float().sigmoid()

    def removal_equals_mask(self, layer: MoELayer, config) -> bool:
        return option(layer.router, config, ("num_group", "n_group"), 1) == 1

    def route(self, logits: torch.Tensor, layer: MoELayer, config) -> tuple[torch.Tensor, torch.Tensor]:
        router = layer.router
        # Most keep the bias on the router; MiniMax-M2 and HY-V3 keep it on the block.
        bias = option(router, layer.block, ("e_score_correction_bias", "expert_bias"), None)
        return top_k_route(
            self.probabilities(logits, layer),
            layer.top_k,
            layer.renormalize,
            choice_bias=None if bias is None else bias.float(),
            groups=option(router, config, ("num_group", "n_group"), 1),
            top_groups=option(router, config, ("topk_group",), 1),
            group_score="top2",
            scaling=option(router, config, ("routed_scaling_factor", "router_scaling_factor"), 1.0),
            blocked=torch.isneginf(logits),
        )
