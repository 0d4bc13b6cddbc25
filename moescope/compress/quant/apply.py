"""Apply a bit plan to a loaded model: check it is the plan's model, then fake-quantise in place."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from moescope.backends.hf.loading import model_identity
from moescope.backends.hf.offload import resident
from moescope.compress.quant.kernels import fake_quantize, quantize_experts_
from moescope.errors import MoescopeError
from moescope.models.base import MoELayer
from moescope.models.layout import expert_matrices
from moescope.models.registry import find_moe_layers
from moescope.plans import UNQUANTISED, BitPlan, QuantOptions, check_bits, load_bit_plan


def non_expert_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Linear layers quantised at `non_expert_bits`: all but routed experts, routers and the LM head."""
    skipped = {id(m) for layer in find_moe_layers(model) for part in (layer.experts, layer.router)
               for m in part.modules()}
    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in skipped and m is not head]


def expert_params(model: nn.Module) -> np.ndarray:
    """Quantisable weights per expert of each MoE layer, [MoE layers]."""
    return np.array([sum(math.prod(w.shape) for w in expert_matrices(layer)) for layer in find_moe_layers(model)])


def check_plan(plan: BitPlan, model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers, after checking that `plan` covers exactly them; MoescopeError if not."""
    plan.model.require(model_identity(model), "bit plan")
    layers = find_moe_layers(model)
    indices = [layer.index for layer in layers]
    if sorted(plan.layers) != sorted(indices):
        missing, extra = sorted(set(indices) - set(plan.layers)), sorted(set(plan.layers) - set(indices))
        raise MoescopeError(f"bit plan is for another model: its layers {sorted(plan.layers)} are not the "
                            f"model's MoE layers {indices} (missing {missing}, extra {extra})")
    for layer in layers:
        if len(plan.layers[layer.index]) != layer.num_experts:
            raise MoescopeError(f"bit plan is for another model: layer {layer.index} lists "
                                f"{len(plan.layers[layer.index])} experts, the model has {layer.num_experts}")
    return layers


def uniform_plan(model: nn.Module, bits: int, options: QuantOptions | None = None) -> BitPlan:
    """Every expert of every MoE layer at `bits`."""
    options = options or QuantOptions()
    check_bits(bits)
    layers = {layer.index: [bits] * layer.num_experts for layer in find_moe_layers(model)}
    return BitPlan.made_with(options, layers, model_identity(model), "uniform", {"bits": bits})


def apply_bit_plan(model: nn.Module, plan: BitPlan) -> nn.Module:
    """Fake-quantise `model` in place as `plan` says (experts sharing a bit width in one op); returns it.
    Offloaded layers are quantised on their execution device and stored back (backends.hf.offload)."""
    options = plan.options
    with torch.no_grad():
        for layer in check_plan(plan, model):
            bits = plan.layers[layer.index]
            with resident(layer.experts, keep_edits=True):
                for matrix in expert_matrices(layer):
                    for b in sorted(set(bits) - {UNQUANTISED}):
                        quantize_experts_(matrix, [e for e, x in enumerate(bits) if x == b], b, options)
        if options.non_expert_bits != UNQUANTISED:
            for _, linear in non_expert_linears(model):
                with resident(linear, keep_edits=True):
                    linear.weight.data.copy_(fake_quantize(linear.weight.data, options.non_expert_bits,
                                                           options.group_size, options.symmetric, options.scales))
    return model


def check_plan_file(path, model: nn.Module) -> BitPlan:
    """The bit plan at `path`, read and checked against `model`."""
    plan = load_bit_plan(path)
    check_plan(plan, model)
    return plan
