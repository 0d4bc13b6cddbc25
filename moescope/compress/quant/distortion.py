"""How much quantising each expert to each width costs, measured on the weights or on the model.

Allocation (compress.quant.allocation) minimises sum(importance x distortion) over experts. Importance
comes from a profile (analysis.criteria) or from Fisher weighting; distortion from the weights
(`weight_distortion`), from expert outputs on calibration tokens (`output_distortion`), or from the
diagonal Fisher (`fisher_distortion`). Absolute squared errors with gate-energy importance estimate
the error power each expert adds to the residual stream; with output errors they are within noise
of the best allocation measured on the demo model (docs/quantization.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moescope.analysis.criteria import profile_scores
from moescope.backends.hf.capture import each_expert_output
from moescope.backends.hf.loading import input_device, model_identity
from moescope.backends.hf.offload import refuse_offloaded, resident
from moescope.calibration import calibration_windows
from moescope.compress.quant.kernels import quantize_experts_, squared_errors
from moescope.errors import MoescopeError
from moescope.models.base import MoELayer
from moescope.models.layout import expert_matrices, prompt_room
from moescope.models.registry import find_moe_layers
from moescope.plans import SUPPORTED_BITS, QuantOptions
from moescope.profiling.store import Profile


def layer_weight_distortion(layer: MoELayer, bits: tuple[int, ...], options: QuantOptions,
                            relative: bool = True) -> np.ndarray:
    """||W - Q(W)||^2 (over ||W||^2 if `relative`) of each expert of one layer, all its matrices
    together, [experts, bits]."""

    out = np.zeros((layer.num_experts, len(bits)))
    with torch.no_grad(), resident(layer.experts):
        for k, b in enumerate(bits):
            errors = norms = 0
            for matrix in expert_matrices(layer):
                err, norm = squared_errors(matrix, b, options)
                errors, norms = errors + err, norms + norm
            out[:, k] = (errors / norms.clamp_min(1e-30) if relative else errors).cpu().numpy()
    return out


def weight_distortion(model: nn.Module, bits: tuple[int, ...] = SUPPORTED_BITS,
                      options: QuantOptions | None = None, relative: bool = True) -> np.ndarray:
    """Squared weight error of each expert, [MoE layers, experts, bits]: ||W - Q(W)||^2 / ||W||^2,
    or ||W - Q(W)||^2 itself with `relative=False`.

    Squared errors add up across experts (each expert's share of the output error power), which is
    what allocation assumes. The absolute error is what an expert adds to the residual stream per
    unit of squared routing weight (for inputs of similar size), so it pairs with gate-energy
    importance; the relative one compares experts as if their weights were equally large.
    """
    options = options or QuantOptions()
    layers = find_moe_layers(model)
    if len({layer.num_experts for layer in layers}) > 1:
        raise MoescopeError("layers with different expert counts: allocate per group of equal layers instead")
    return np.stack([layer_weight_distortion(layer, bits, options, relative) for layer in layers])


def fisher_distortion(model: nn.Module, input_ids: torch.Tensor, bits: tuple[int, ...] = SUPPORTED_BITS,
                      options: QuantOptions | None = None) -> np.ndarray:
    """Estimated loss increase of quantising each expert alone, [MoE layers, experts, bits]:
    1/2 sum F (Q(W) - W)^2 over the expert's weights, with F the diagonal empirical Fisher (squared
    gradients of the calibration loss, one window at a time). The second-order estimate behind
    HAWQ and SqueezeLLM: it weighs each weight's error by how much the loss depends on it, so usage,
    routing weight and the expert's place in the network are all in it; no profile is needed.
    """


    options = options or QuantOptions()
    refuse_offloaded(model, "Fisher weighting (gradients of every expert weight)")
    layers = find_moe_layers(model)
    if len({layer.num_experts for layer in layers}) > 1:
        raise MoescopeError("layers with different expert counts: allocate per group of equal layers instead")
    input_ids = input_ids.to(input_device(model))
    named = [(layer, w, dict(layer.experts.named_parameters())[w.name]) for layer in layers
             for w in expert_matrices(layer)]
    wanted = {id(param) for _, _, param in named}
    flags = {param: param.requires_grad for param in model.parameters()}
    fisher = {id(param): torch.zeros_like(param, dtype=torch.float32) for _, _, param in named}
    try:
        for param in model.parameters():
            param.requires_grad_(id(param) in wanted)
        for row in input_ids.split(1):
            model.zero_grad(set_to_none=True)
            model(input_ids=row, labels=row).loss.backward()
            for _, _, param in named:
                fisher[id(param)] += param.grad.float().square()
    finally:
        model.zero_grad(set_to_none=True)
        for param, flag in flags.items():
            param.requires_grad_(flag)
    out = np.zeros((len(layers), layers[0].num_experts, len(bits)))
    row = {layer.index: i for i, layer in enumerate(layers)}
    with torch.no_grad():
        for layer, weight, param in named:
            sensitivity = fisher[id(param)].view(weight.view.shape)
            for k, b in enumerate(bits):
                out[row[layer.index], :, k] += 0.5 * squared_errors(weight, b, options, sensitivity)[0].cpu().numpy()
    return out


def expert_outputs(layer: MoELayer, hidden: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """f_e(hidden[t]) in float32 for each slot (t, e = ids[t, r]), [tokens x k, H], about `chunk` slots
    per experts call."""
    rows = max(1, chunk // ids.shape[1])
    return torch.cat([each_expert_output(layer, h, i).float().flatten(0, 1)
                      for h, i in zip(hidden.split(rows), ids.split(rows), strict=True)])


def per_expert(values: torch.Tensor, experts: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of `values` per expert id, float64 [count] on the CPU."""

    return torch.zeros(count, dtype=torch.float64).index_add_(0, experts.cpu(), values.double().cpu())


def output_distortion(model: nn.Module, input_ids: torch.Tensor, bits: tuple[int, ...] = SUPPORTED_BITS,
                      options: QuantOptions | None = None, relative: bool = True, batch_size: int = 8,
                      chunk: int = 8192) -> np.ndarray:
    """Squared error of each expert's output on the calibration tokens routed to it, [MoE layers,
    experts, bits]: sum ||f_Q(x) - f(x)||^2 / sum ||f(x)||^2, or with `relative=False` the mean
    ||f_Q(x) - f(x)||^2 per routed token (the activation-aware twin of the absolute weight error).

    Each layer is measured on the inputs the unquantised model gives it (as GPTQ does), by calling
    the experts module with one expert per token at weight 1. Experts no token chose get their
    weight distortion, scaled by the layer's median output/weight ratio. Holds every MoE layer's
    inputs: give a few thousand tokens.
    """


    options = options or QuantOptions()
    layers = find_moe_layers(model)
    if len({layer.num_experts for layer in layers}) > 1:
        raise MoescopeError("layers with different expert counts: allocate per group of equal layers instead")
    if any(layer.family.hook_points(layer) != "experts" for layer in layers):
        raise MoescopeError("this model's experts are not called with routing ids: use weight distortion")
    inputs: dict[int, list] = {layer.index: [] for layer in layers}

    def keep_inputs(index: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            inputs[index].append((hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1, ids.shape[-1])))
        return hook

    handles = [layer.experts.register_forward_pre_hook(keep_inputs(layer.index), with_kwargs=True)
               for layer in layers]
    try:
        with torch.no_grad():
            for batch in input_ids.split(batch_size):
                model(input_ids=batch.to(input_device(model)))
    finally:
        for handle in handles:
            handle.remove()

    out = np.zeros((len(layers), layers[0].num_experts, len(bits)))
    for i, layer in enumerate(layers):
        with torch.no_grad(), resident(layer.experts):
            hidden, ids = (torch.cat(parts) for parts in zip(*inputs.pop(layer.index), strict=True))
            experts = ids.flatten().long()  # one slot per (token, rank)
            slots = (hidden, ids, chunk)
            reference = expert_outputs(layer, *slots)
            energy = per_expert(reference.square().sum(-1), experts, layer.num_experts)
            scale = energy if relative else per_expert(torch.ones(len(experts)), experts, layer.num_experts)
            weights = expert_matrices(layer)
            saved = [weight.view.clone() for weight in weights]
            for k, b in enumerate(bits):
                try:
                    for weight in weights:
                        quantize_experts_(weight, list(range(layer.num_experts)), b, options)
                    error = (expert_outputs(layer, *slots) - reference).square().sum(-1)
                    out[i, :, k] = (per_expert(error, experts, layer.num_experts) / scale).numpy()
                finally:  # the model leaves unquantised, whatever happens
                    for weight, original in zip(weights, saved, strict=True):
                        weight.view.copy_(original)
            unseen = (energy == 0).numpy()
            if unseen.any():  # weight distortion in the units of the measured ones (median ratio per width)
                proxy = layer_weight_distortion(layer, bits, options, relative)
                ratio = np.median(out[i, ~unseen] / proxy[~unseen], axis=0) if (~unseen).any() else 1.0
                out[i, unseen] = proxy[unseen] * ratio
    return out


def load_profile_for(model: nn.Module, profile_dir: str | Path):
    """The profile at `profile_dir`, after checking it was made on this model."""
    profile = Profile.load(profile_dir)
    profile.model.require(model_identity(model), f"profile {profile_dir}")
    return profile


def allocation_inputs(model: nn.Module, kind: str, profile_dir: str | Path | None, choices: tuple[int, ...],
                      options: QuantOptions, calibration: str | None = None, tokenizer=None,
                      tokens: int = 16384) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(importance [MoE layers, experts], distortion [..., choices], source for the plan) for `budget_plan`.

    `kind` "fisher" needs no profile: the Fisher weighting already holds how much each expert matters,
    so importance is 1 (and ranking experts alone, as tiers do, uses their estimated loss at the
    lowest width). Any other kind reads the profile and pairs it with `measured_distortion`.
    """
    fisher = kind == "fisher"
    if not profile_dir and not fisher:
        raise MoescopeError(f"--importance {kind} needs --profile PROFILE_DIR: importance comes from a profile")
    importance = None
    if not fisher:  # the profile is checked (and read) before the slow measurement
        profile = load_profile_for(model, profile_dir)
        importance = profile_scores(profile, kind)
    distortion, described = measured_distortion(model, choices, options, calibration, tokenizer, tokens, fisher)
    source = {"importance": kind, "bit_choices": list(choices), "distortion": described}
    if fisher:
        return np.ones(distortion.shape[:2]), distortion, source
    source |= {"profile": str(profile_dir), "calibration_hash": profile.calibration_hash}
    return importance, distortion, source


def measured_distortion(model: nn.Module, choices: tuple[int, ...], options: QuantOptions,
                        calibration: str | None = None, tokenizer=None, tokens: int = 16384,
                        fisher: bool = False) -> tuple[np.ndarray, str]:
    """(distortion [MoE layers, experts, choices], what it is): the Fisher-weighted weight error on
    `calibration` with `fisher`, else the absolute squared output error on `calibration` windows when
    given, else the absolute squared weight error (absolute errors pair with gate-energy importance;
    see `weight_distortion`)."""
    length = min(512, prompt_room(model.config, 0, "--calibration") or 512)  # within the trained context
    if fisher:
        if not calibration:
            raise MoescopeError("--importance fisher needs --calibration JSONL: the gradients come from it")
        ids = calibration_windows(calibration, tokenizer, count=max(1, tokens // length), length=length)
        return fisher_distortion(model, ids, choices, options), f"Fisher-weighted squared weight error on {calibration}"
    if calibration:
        ids = calibration_windows(calibration, tokenizer, count=max(1, tokens // length), length=length)
        return output_distortion(model, ids, choices, options, relative=False), f"squared output error on {calibration}"
    return weight_distortion(model, choices, options, relative=False), "squared weight error"
