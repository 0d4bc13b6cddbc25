"""Router repair: refit only the router weights of a pruned or merged model so that it routes the way
the original did.

After removal or merging, the router still scores experts as if the old set were there, and every
layer after the first sees hidden states the earlier changes have moved. Repair distils the
original's router scores, mapped onto the candidate's experts (`RouterFamily.mapped_logits`: the
kept experts' scores for removal, each group's summed mass for merging, nothing for experts that
were zeroed or masked in place), into the candidate's router weights, one layer at a time in forward
order, on the inputs that layer now receives.

It takes one forward pass over the calibration batch: a pre-hook on each router fits that router's
weight matrix (L-BFGS on the family's routing divergence, convex in the weights; the logit bias,
correction biases and every other tensor stay as they are) on exactly the inputs it is about to
see, then lets the pass continue through the refitted router, so each later layer is fitted on the
inputs the repaired layers produce. The divergence is the one routing agreement reports.

This distils router distributions layer by layer. Router KD (Hyeon and Do, 2026) distils the
model's next-token distribution end to end instead; both update the routers alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moescope.checkpoints import check_checkpoint_dir, read_metadata
from moescope.compress.checkpoint import rewrite_checkpoint
from moescope.compress.routing import RouterIO, linear_logits, router_parameters
from moescope.errors import MoescopeError
from moescope.models.base import MoELayer
from moescope.models.layout import classify_key
from moescope.models.registry import find_moe_layers

REPAIR_STEPS = 300


def refit_router(layer: MoELayer, inputs: torch.Tensor, target: torch.Tensor, steps: int) -> dict[str, float]:
    """Fit the router weight of `layer` in place so its scores on `inputs` [n, H] match `target` logits."""
    weight, bias = router_parameters(layer)
    fixed_bias = bias.detach().float() if bias is not None else None
    trained = weight.detach().float().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([trained], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-14)

    def loss() -> torch.Tensor:
        return layer.family.routing_divergence(linear_logits(inputs, trained, fixed_bias), target)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss()
        value.backward()
        return value

    with torch.no_grad():
        before = float(loss())
    optimiser.step(closure)
    with torch.no_grad():
        after = float(loss())
        if after <= before:  # L-BFGS only descends, but never keep a worse router
            weight.copy_(trained.to(weight.dtype))
    return {"divergence_before": before, "divergence_after": min(before, after)}


def repair_routers(model, original: dict[int, RouterIO], batch: tuple, targets: dict[int, torch.Tensor],
                   steps: int = REPAIR_STEPS) -> dict[int, dict[str, float]]:
    """Refit every router of `model` (pruned or merged) in place, in one forward pass over `batch`, towards
    the `original` model's routing captured on the same batch; returns the fitted divergence per layer."""
    if steps < 1:
        raise MoescopeError(f"router repair needs at least 1 step, not {steps}")
    ids, mask = batch
    device = next(model.parameters()).device
    keep = mask.reshape(-1).bool().to(device)
    fitted: dict[int, dict[str, float]] = {}

    def hook_for(layer: MoELayer):
        def refit(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            flat = hidden.reshape(-1, hidden.shape[-1])
            if flat.shape[0] != keep.numel():
                raise MoescopeError(f"{layer.path}: the router saw {flat.shape[0]} tokens, the batch has "
                                    f"{keep.numel()}; this architecture's router cannot be refitted")
            inputs = flat[keep].detach().float()
            weight, bias = router_parameters(layer)
            actual = layer.family.router_logits(module.forward(flat[keep][:8])).float()
            if not torch.allclose(actual, linear_logits(inputs[:8], weight, bias), atol=1e-2, rtol=1e-2):
                raise MoescopeError(f"the router of {layer.path} is not a linear map of its input; it cannot be "
                                    "refitted")
            target = layer.family.mapped_logits(original[layer.index].logits.to(device), targets[layer.index],
                                                layer.num_experts)
            with torch.enable_grad():
                fitted[layer.index] = refit_router(layer, inputs, target, steps)

        return refit

    handles = [layer.router.register_forward_pre_hook(hook_for(layer), with_kwargs=True)
               for layer in find_moe_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return fitted


def repair_checkpoint(source: str | Path, out: str | Path, model, report: dict, overwrite: bool = False) -> Path:
    """Write `source` (a pruned or merged checkpoint) to `out` with the router weight matrices of `model`
    (the same checkpoint, loaded and repaired); every other tensor is copied byte for byte, and the
    metadata gains the repair report."""
    source = check_checkpoint_dir(source)
    layers = find_moe_layers(model)
    counts = {layer.index: layer.num_experts for layer in layers}
    weights = {layer.index: router_parameters(layer)[0].detach().cpu() for layer in layers}

    def edit(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        where = classify_key(name, tuple(tensor.shape), counts)
        if where.kind != "router" or tensor.dim() != 2:
            return [(name, tensor)]
        if tuple(weights[where.layer].shape) != tuple(tensor.shape):
            raise MoescopeError(f"{name}: the repaired router has shape {tuple(weights[where.layer].shape)}, the "
                                f"checkpoint {tuple(tensor.shape)}")
        return [(name, weights[where.layer].to(tensor.dtype))]

    metadata = {**read_metadata(source), "repair": report}
    return rewrite_checkpoint(source, out, edit, metadata=metadata, description="router repair", overwrite=overwrite)
