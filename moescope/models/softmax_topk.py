"""Softmax over all experts, then top-k (Qwen-MoE, OLMoE, Mixtral, Jamba, DeepSeek-V2, ...).

Variants handled by parameters: renormalising the top-k weights (always, never, or per
`norm_topk_prob`), DeepSeek-V2's group-limited greedy choice with a scaling factor, and ERNIE-4.5's
correction bias that shifts the choice but not the weights.
"""

from __future__ import annotations

import torch

from moescope.models.base import MoELayer, RouterFamily, option, top_k_route


class SoftmaxTopK(RouterFamily):
    name = "softmax-topk"
    scores = "softmax"
    model_types = {
        "qwen2_moe": "config",
        "qwen3_moe": "config",
        "qwen3_next": "config",
        "qwen3_5_moe": True,
        "qwen3_5_moe_text": True,
        "olmoe": "config",
        "mixtral": True,
        "minimax": True,
        "jamba": False,
        "hunyuan_v1_moe": True,
        "ernie4_5_moe": True,
        "deepseek_v2": False,
        "cohere2_moe": "config",
        "lara_mini": "config",
        "mellum": "config",
        "zaya": False,
        "dbrx": True,  # moe_normalize_expert_weights=1 (an L1 norm); checked in `renormalizes`
    }

    def renormalizes(self, model_type: str, router, config) -> bool:
        if model_type == "dbrx":
            return getattr(config.ffn_config, "moe_normalize_expert_weights", None) == 1
        return super().renormalizes(model_type, router, config)

    def probabilities(self, logits: torch.Tensor, layer: MoELayer) -> torch.Tensor:
        return logits.float().softmax(-1)

    def removal_equals_mask(self, layer: MoELayer, config) -> bool:
        return getattr(layer.router, "topk_method", "greedy") != "group_limited_greedy"

    def route(self, logits: torch.Tensor, layer: MoELayer, config) -> tuple[torch.Tensor, torch.Tensor]:
        router = layer.router
        bias_module = getattr(router, "moe_statics", None)  # ERNIE-4.5 keeps its bias in a submodule
        bias = getattr(bias_module, "e_score_correction_bias", None)
        grouped = getattr(router, "topk_method", "greedy") == "group_limited_greedy"
        return top_k_route(
            self.probabilities(logits, layer),
            layer.top_k,
            layer.renormalize,
            choice_bias=None if bias is None else bias.float().reshape(-1),
            groups=option(router, config, ("num_group", "n_group"), 1) if grouped else 1,
            top_groups=option(router, config, ("topk_group",), 1),
            group_score="max",
            scaling=option(router, config, ("routed_scaling_factor",), 1.0),
            blocked=torch.isneginf(logits),
        )
