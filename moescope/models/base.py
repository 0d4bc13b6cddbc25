"""What an MoE layer is, and the shared routing arithmetic the router families build on.

A router family knows how a router turns logits into the (expert ids, weights) its experts receive.
Capture does not depend on it (capture reads what the experts module was actually called with);
the family is used to describe the layer, to provide the full router distribution on request, and
to re-route with some experts masked out (pruning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moescope.errors import MoescopeError


@dataclass
class MoELayer:
    """One MoE block of a loaded model."""

    index: int  # decoder layer index (the N in `layers.N.`)
    path: str  # module path of the block, e.g. "model.layers.3.mlp"
    block: nn.Module = field(repr=False)
    experts: nn.Module = field(repr=False)
    router: nn.Module = field(repr=False)
    family: RouterFamily = field(repr=False)
    num_experts: int
    top_k: int
    renormalize: bool  # top-k weights rescaled to sum to 1 (before any scaling factor)
    shared_expert: bool
    params_per_expert: int

    def describe(self) -> dict:
        return {
            "layer": self.index,
            "path": self.path,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "router_family": self.family.name,
            "renormalize": self.renormalize,
            "shared_expert": self.shared_expert,
            "params_per_expert": self.params_per_expert,
        }


def top_k_route(
    scores: torch.Tensor,
    top_k: int,
    renormalize: bool,
    *,
    choice_bias: torch.Tensor | None = None,
    groups: int = 1,
    top_groups: int = 1,
    group_score: str = "top2",
    scaling: float = 1.0,
    blocked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick top-k experts from per-expert scores [tokens, E]; return (ids, weights).

    `choice_bias` shifts the scores used for choosing only (DeepSeek-V3's correction bias); the
    weights are always the unbiased scores. With `groups > 1`, experts are split into equal groups,
    each group scored by its best expert ("max") or best two ("top2"), and only the `top_groups`
    best groups may be chosen from. Experts marked in `blocked` [tokens, E] are never chosen.
    """
    choice = scores if choice_bias is None else scores + choice_bias
    if blocked is not None:
        choice = choice.masked_fill(blocked, float("-inf"))
    if groups > 1:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, groups, experts // groups)
        per_group = grouped.max(-1).values if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep_groups = torch.zeros_like(per_group, dtype=torch.bool)
        keep_groups.scatter_(1, per_group.topk(top_groups, dim=-1).indices, True)
        keep = keep_groups.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


def option(router: nn.Module, config, names: tuple[str, ...], default):
    """First attribute found on the router, then on the config, else `default`."""
    for source in (router, config):
        for name in names:
            value = getattr(source, name, None)
            if value is not None:
                return value
    return default


class RouterFamily:
    """How one family of routers chooses experts. Subclasses override `route` and `probabilities`.

    `model_types` maps each transformers `model_type` of the family to its renormalisation rule:
    True / False, or "config" to read `norm_topk_prob` from the router or config.
    """

    name = "other"
    model_types: dict[str, bool | str] = {}
    # What the router's scores are, for merging experts and refitting routers: "softmax" (weights
    # come from a softmax over the logits, or over the chosen logits), "sigmoid" (one independent
    # score per expert), None (no score the logits can be matched on).
    scores: str | None = None

    def renormalizes(self, model_type: str, router: nn.Module, config) -> bool:
        rule = self.model_types.get(model_type, "config")
        if rule == "config":
            return bool(option(router, config, ("norm_topk_prob",), False))
        return bool(rule)

    def router_logits(self, router_output) -> torch.Tensor:
        """The logits [tokens, E] from what the router module returned."""
        return router_output[0] if isinstance(router_output, tuple) else router_output

    def probabilities(self, logits: torch.Tensor, layer: MoELayer) -> torch.Tensor | None:
        """The full distribution over experts, where the family defines one."""
        return None

    def route(self, logits: torch.Tensor, layer: MoELayer, config) -> tuple[torch.Tensor, torch.Tensor]:
        """Reproduce the router's choice (ids, weights) from its logits; -inf logits are never chosen."""
        raise NotImplementedError(f"router family {self.name!r} cannot re-route from logits")

    def reroute(self, output, layer: MoELayer, config, offsets: torch.Tensor):
        """The router's output as if `offsets` [E] had been added to its logits (-inf: never chosen).

        Used as a forward hook on the router for run-time masking and soft pruning. Routers that
        return bare logits (DBRX) leave the choice to their block, which sees the shifted logits.
        """
        logits = self.router_logits(output) + offsets.to(self.router_logits(output).device)
        if not isinstance(output, tuple):
            return logits
        ids, weights = self.route(logits, layer, config)
        return (logits, weights.to(output[1].dtype), ids.to(output[2].dtype), *output[3:])

    def removal_equals_mask(self, layer: MoELayer, config) -> bool:
        """Whether removing experts (their tensors and router rows) must choose exactly what a -inf mask
        of them chooses. True where each expert's score depends on its own logit alone (or on a softmax
        over all experts, which a -inf logit leaves out) and experts are ranked, not grouped; group-limited
        routing changes when the groups shrink, so there removal is a different model."""
        return False

    def hook_points(self, layer: MoELayer) -> str:
        """Where capture reads the routing: "experts" (its call arguments) or "router" (its output)."""
        return "experts"

    def mapped_logits(self, logits: torch.Tensor, targets: torch.Tensor, count: int) -> torch.Tensor:
        """The router's logits [n, E] as logits [n, count] over the experts of a pruned or merged model.

        `targets` [E] holds the new index of each original expert (-1: removed). With softmax scores a
        new expert gets the log-sum-exp of the logits mapped to it, so it holds the softmax mass of
        every expert folded into it; with sigmoid scores only one-to-one maps are defined. New experts
        that no original expert maps to get -inf.
        """
        if self.scores is None:
            raise MoescopeError(f"router family {self.name!r} defines no scores to match a router on: merging and "
                                "router repair support softmax and sigmoid routers")
        logits, targets = logits.float(), targets.to(logits.device)
        kept = targets >= 0
        index = targets[kept].expand(logits.shape[0], -1)
        if self.scores == "sigmoid":
            if bool((torch.bincount(targets[kept], minlength=count) > 1).any()):
                raise MoescopeError(f"router family {self.name!r} scores each expert with its own sigmoid: folding "
                                    "several experts into one has no router row to match; prune with remove instead")
            return torch.full((logits.shape[0], count), float("-inf"), device=logits.device).scatter(
                1, index, logits[:, kept])
        peak = torch.full((logits.shape[0], count), float("-inf"), device=logits.device).scatter_reduce(
            1, index, logits[:, kept], reduce="amax")
        safe_peak = peak.nan_to_num(neginf=0.0)
        mass = torch.zeros_like(peak).scatter_add(1, index, (logits[:, kept] - safe_peak.gather(1, index)).exp())
        return mass.log() + safe_peak

    def routing_divergence(self, logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
        """Mean divergence [] of the scores from `logits` [n, E] to the scores from `target_logits` (-inf:
        an expert that should get nothing): KL(target || candidate) over the softmax for softmax routers,
        the binary KL of each expert's sigmoid, summed over experts, for sigmoid routers. Zero exactly when
        the scores agree; differentiable in `logits`, so router repair minimises it."""
        if self.scores == "softmax":
            target = target_logits.float().softmax(-1)
            cross = torch.where(target > 0, target * logits.float().log_softmax(-1), 0.0)
            return (torch.special.xlogy(target, target) - cross).sum(-1).mean()
        if self.scores == "sigmoid":
            p, log_q = target_logits.float().sigmoid(), torch.nn.functional.logsigmoid(logits.float())
            log_not_q = torch.nn.functional.logsigmoid(-logits.float())
            divergence = (torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p) - p * log_q
                          - (1 - p) * log_not_q)
            return divergence.sum(-1).mean()
        raise MoescopeError(f"router family {self.name!r} defines no scores to match a router on")
