"""What merging and router repair measure routing with: calibration tokens, each router's inputs and
logits on them, where each original expert went, and how well a smaller model's routing agrees.

Routing agreement compares a pruned or merged model with the original on the same tokens. Each
token's chosen experts in the original are mapped to the candidate's experts (removed experts drop
out; the members of a merged group all map to it); agreement is the share of those mapped experts
that the candidate also chose, averaged over tokens (tokens whose every chosen expert was removed
are left out). Divergence is the router family's divergence from the original's scores over the
candidate's experts (`RouterFamily.routing_divergence`: KL for softmax routers). Layer 0 sees the
same inputs in both models; later layers see inputs the earlier changes have already moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moescope.backends.hf.capture import capture_routing
from moescope.calibration import encode, load_calibration, padded
from moescope.errors import MoescopeError
from moescope.models.base import MoELayer
from moescope.models.registry import find_moe_layers
from moescope.plans import MergePlan, PrunePlan


@dataclass
class RouterIO:
    """One MoE layer on the calibration tokens (padding removed), on the CPU in float32."""

    inputs: torch.Tensor  # [n, H] hidden states the router and the experts received
    logits: torch.Tensor  # [n, E] the router's logits
    chosen: torch.Tensor  # [n, k] the experts it chose


def spread(items: list, count: int) -> list:
    """`count` items spread evenly over `items`, in order (calibration files are often sorted by domain)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def calibration_batch(tokenizer, calibration: str | Path, prompts: int, max_tokens: int) -> tuple:
    """(ids, attention mask) of one right-padded batch: `prompts` prompts spread over the file, each
    cut to its first `max_tokens` tokens."""
    if not Path(calibration).is_file():
        raise MoescopeError(f"calibration set {calibration} not found")
    if prompts < 2 or max_tokens < 2:
        raise MoescopeError("routing calibration needs at least 2 prompts of at least 2 tokens")
    encoded = encode(spread(load_calibration(calibration), prompts), tokenizer, max_tokens)
    return padded([e.ids for e in encoded])


def halves(batch: tuple) -> tuple[tuple, tuple]:
    """The even rows of a batch (to fit on) and the odd rows (to check on)."""
    ids, mask = batch
    return (ids[0::2], mask[0::2]), (ids[1::2], mask[1::2])


@torch.no_grad()
def capture_router_io(model, batch: tuple) -> dict[int, RouterIO]:
    """Every MoE layer's router inputs, logits and choices on one batch."""
    ids, mask = batch
    device = next(model.parameters()).device
    with capture_routing(model, router_io=True) as recorder:
        model(input_ids=ids.to(device), attention_mask=mask.to(device))
    captured = {}
    for event in recorder.events:
        if event.inputs is None or event.logits is None:
            raise MoescopeError(f"layer {event.layer}: this architecture's experts never see the router's input "
                                "(they run densely), so its routers cannot be matched or refitted")
        captured[event.layer] = RouterIO(event.inputs.float().cpu(), event.logits.float().cpu(),
                                         event.expert_ids.cpu())
    return captured


def router_parameters(layer: MoELayer) -> tuple[torch.nn.Parameter, torch.nn.Parameter | None]:
    """The router's weight [E, H] and its logit bias [E] (None when it has none)."""
    weight, bias = getattr(layer.router, "weight", None), getattr(layer.router, "bias", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.shape[0] != layer.num_experts or weight.dim() != 2:
        raise MoescopeError(f"the router of {layer.path} has no [{layer.num_experts}, hidden] weight to refit")
    has_bias = isinstance(bias, torch.nn.Parameter) and tuple(bias.shape) == (layer.num_experts,)
    return weight, bias if has_bias else None


def linear_logits(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """inputs @ weight.T (+ bias), in float32."""
    logits = inputs.float() @ weight.float().T
    return logits + bias.float() if bias is not None else logits


def check_linear_router(layer: MoELayer, io: RouterIO) -> None:
    """Refuse a router whose logits are not a linear map (weight, logit bias) of the experts' input:
    its rows cannot be fitted or refitted as moescope does it."""
    weight, bias = router_parameters(layer)
    expected = linear_logits(io.inputs, weight.detach().cpu(), None if bias is None else bias.detach().cpu())
    scale = float(io.logits.abs().max()) + 1e-6
    if not torch.allclose(expected, io.logits, atol=1e-2 * scale, rtol=1e-2):
        raise MoescopeError(f"the router of {layer.path} does not compute its logits as a linear map of the experts' "
                            "input, so its rows cannot be fitted; merging and router repair do not support it")


def expert_targets(plan: PrunePlan | MergePlan, method: str) -> dict[int, torch.Tensor]:
    """For each MoE layer, the candidate expert each original expert became (-1: gone): merged groups
    for a merge plan, renumbered kept experts for `remove`, the same index for methods that keep the
    experts in place (their pruned experts should receive nothing)."""
    if isinstance(plan, MergePlan):
        return {layer: torch.tensor(plan.targets(layer)) for layer in plan.num_experts}
    targets = {}
    for layer, count in plan.num_experts.items():
        kept = plan.kept(layer)
        new = torch.full((count,), -1, dtype=torch.long)
        new[kept] = torch.arange(len(kept)) if method == "remove" else torch.tensor(kept, dtype=torch.long)
        targets[layer] = new
    return targets


def agreement(original_chosen: torch.Tensor, candidate_chosen: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean share of each token's mapped original choices that the candidate also chose (see the module)."""
    mapped = targets[original_chosen]  # [n, k], -1 for removed experts
    k = mapped.shape[1]
    earlier = torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)  # [i, j]: i < j
    repeated = ((mapped[:, :, None] == mapped[:, None, :]) & earlier).any(1)  # the same group listed earlier
    distinct = (mapped >= 0) & ~repeated
    found = (mapped[:, :, None] == candidate_chosen[:, None, :]).any(-1) & distinct
    counted = distinct.sum(-1) > 0
    if not bool(counted.any()):
        return float("nan")
    return float((found.sum(-1)[counted] / distinct.sum(-1)[counted]).mean())


def routing_agreement(model, original: dict[int, RouterIO], candidate: dict[int, RouterIO],
                      targets: dict[int, torch.Tensor]) -> dict[int, dict[str, float]]:
    """Per MoE layer of the candidate `model`: agreement and divergence with the original's routing."""
    report = {}
    for layer in find_moe_layers(model):
        base, mine = original[layer.index], candidate[layer.index]
        target = layer.family.mapped_logits(base.logits, targets[layer.index], layer.num_experts)
        report[layer.index] = {"agreement": agreement(base.chosen, mine.chosen, targets[layer.index]),
                               "divergence": float(layer.family.routing_divergence(mine.logits, target))}
    return report


def mean_over_layers(report: dict[int, dict[str, float]], key: str) -> float:
    values = [row[key] for row in report.values() if row[key] == row[key]]
    return sum(values) / len(values) if values else float("nan")
