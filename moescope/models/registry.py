"""Find every MoE layer of a loaded transformers model and say how it routes.

The registry maps `config.model_type` to a router family (one small file per family). Unknown
model types fall back to duck typing: any module with an `experts` child and a `gate`/`router`
child is an MoE block, routed by an unknown ("other") family; capture still works for it because
capture reads the experts' call arguments, not the router.
"""

from __future__ import annotations

import re

from torch import nn

from moescope.errors import MoescopeError
from moescope.models.base import MoELayer, RouterFamily, option
from moescope.models.biased_topk_sigmoid import BiasedTopKSigmoid
from moescope.models.layout import EXPERT_COUNT_KEYS, TOP_K_KEYS, config_value, text_config
from moescope.models.sigmoid_grouped import SigmoidGrouped
from moescope.models.softmax_topk import SoftmaxTopK
from moescope.models.sparsemixer import SparseMixer
from moescope.models.topk_sigmoid import TopKSigmoid
from moescope.models.topk_softmax import TopKSoftmax

FAMILIES: list[RouterFamily] = [SoftmaxTopK(), SigmoidGrouped(), TopKSoftmax(), SparseMixer(), TopKSigmoid(),
                              BiasedTopKSigmoid()]
REGISTRY: dict[str, RouterFamily] = {mt: family for family in FAMILIES for mt in family.model_types}
ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")

__all__ = ["MoELayer", "RouterFamily", "REGISTRY", "family_for", "find_moe_layers"]


def family_for(model_type: str) -> RouterFamily:
    return REGISTRY.get(model_type) or RouterFamily()


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block of `model`, in forward order. Raises MoescopeError when there is none."""
    config = text_config(model.config)
    model_type = getattr(config, "model_type", "unknown")
    family = family_for(model_type)
    layers = []
    for path, block in model.named_modules():
        experts = getattr(block, "experts", None)
        router = next((getattr(block, n) for n in ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
        if not isinstance(experts, nn.Module) or router is None:
            continue
        num_experts = option(router, experts, ("num_experts",), None) or config_value(config, EXPERT_COUNT_KEYS)
        top_k = option(router, block, ("top_k",), None) or config_value(config, TOP_K_KEYS)
        if not num_experts or not top_k:
            raise MoescopeError(f"found an MoE block at {path} but could not tell its expert count or top-k")
        match = re.search(r"\.(\d+)\.", f".{path}.")
        layers.append(
            MoELayer(
                index=int(match.group(1)) if match else len(layers),
                path=path,
                block=block,
                experts=experts,
                router=router,
                family=family,
                num_experts=int(num_experts),
                top_k=int(top_k),
                renormalize=family.renormalizes(model_type, router, config),
                shared_expert=any(isinstance(getattr(block, n, None), nn.Module) for n in SHARED_NAMES),
                params_per_expert=sum(p.numel() for p in experts.parameters()) // int(num_experts),
            )
        )
    if not layers:
        if model_type in REGISTRY:
            raise MoescopeError(f"no MoE layers found in {model_type}: the model has no experts module")
        searched = sorted({type(m).__name__ for m in model.modules()})
        raise MoescopeError(
            f"no MoE layers found in {model_type}: searched for a module with an 'experts' child and a "
            f"'gate' or 'router' child among {', '.join(searched[:40])}"
        )
    return layers
