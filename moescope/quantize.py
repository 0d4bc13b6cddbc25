"""Per-expert mixed precision: fake quantisation in place, bit allocation under a budget, bit plans.

The library behind `moescope quantize` (its command line is `moescope.quantize_cli`), `sweep quant`
and `export`.

Fake quantisation rounds each weight to a group-wise round-to-nearest grid and stores the result
back in the model's own dense tensors (`param.data[e]` of the fused `experts.*` tensors), so a
quantised model runs exactly as fast as the original and can be evaluated anywhere. Groups run
along the input dimension of each linear map (`group_size` inputs share one scale), as in MLX,
llama.cpp, GPTQ and torchao. Experts that share a bit width are quantised in one tensor op.

- symmetric: scale = absmax / ((2^b - 1) / 2), q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1),
  w' = q * scale (torchao's convention: all 2^b levels are used). One fp16 scale per group.
- asymmetric: scale = (max - min) / (2^b - 1), q = round((w - min) / scale), w' = q * scale + min
  (MLX's affine mode and llama.cpp's Q4_1: the offset is a float, not an integer zero point).
  An fp16 scale and an fp16 offset per group.
Either way |w - w'| <= scale / 2 for every weight. A last group shorter than `group_size` (input
dimension not divisible by it) is a group of its own.

Scales (`scales`): "minmax" takes the range from the group's extremes, as above. "mse" also tries
the range shrunk by each factor in `SHRINK_FACTORS` (clipping the outermost weights) and keeps, per
group, the candidate with the least squared error: never worse than minmax, and at 2-3 bits much
better (llm-compressor's "mse" observer and llama.cpp's scale search do the same kind of search). It
takes about a dozen times as long. "mlx" (asymmetric only) is MLX's affine rule, `round_to_mlx_grid`:
the plans `moescope export --format mlx` writes use it, so that `quantize --plan` reproduces the
weights mlx-lm serves.

Expert tensor layouts: transformers 5 stores `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`
([E, out, in]); experts that set `is_transposed` (gpt-oss) and the classes in `TRANSPOSED` store
[E, in, out]. DBRX keeps [E * I, H] matrices, viewed here as [E, I, H]. Biases are never quantised.

Bit plan (JSON, `save_bit_plan` / `load_bit_plan`; the tiers module writes the same format):

    {"format_version": 1, "kind": "bit_plan",
     "model": {"model_type": "qwen3_moe", "config_hash": "..."},   # from moescope.profile.model_identity
     "method": "uniform" | "tiers" | "budget",
     "group_size": 128, "symmetric": true, "scales": "minmax",     # "scales" may be absent: minmax
     "non_expert_bits": 16,          # linear layers outside the routed experts (attention, shared experts)
     "layers": {"<decoder layer index>": [bits of expert 0, bits of expert 1, ...], ...},
     "source": {...}}                # free-form: profile, importance, budget, ... the plan came from

Bits are 2, 3, 4 or 8, or 16 for "leave unquantised". Every MoE layer of the model is listed with
one entry per expert. Embeddings, the LM head, norms, routers and biases are never quantised.

Allocation (`allocate_bits`, `budget_plan`) minimises sum(importance x distortion) over experts
subject to a budget on average bits per expert weight or on the packed model's bytes (see
`memory_estimate`). Importance comes from a profile (frequency, gate mass, gate energy, saliency),
distortion from the weights (`weight_distortion`) or from expert outputs on calibration tokens
(`output_distortion`); absolute squared errors with gate-energy importance estimate the error
power each expert adds to the residual stream; with output errors they are within noise of the best
allocation measured on the demo model (docs/quantization.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope.errors import MoescopeError
from moescope.output import read_json, write_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moescope.models import MoELayer

FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
UNQUANTISED = 16
METHODS = ("uniform", "tiers", "budget")
# Experts classes without an `is_transposed` attribute whose (named) matrices are stored [in, out].
TRANSPOSED = {"Llama4TextExperts": {"gate_up_proj", "down_proj"}, "DbrxExperts": {"mlp.w2"}}
CHUNK_ELEMENTS = 2**25  # quantise at most this many weights at once (bounds the float32 temporaries)
SCALES = ("minmax", "mse", "mlx")
SHRINK_FACTORS = tuple(1 - 0.05 * k for k in range(1, 13))  # 0.95 ... 0.40 of the group's range


@dataclass
class QuantOptions:
    group_size: int = 128  # inputs sharing one scale (and offset)
    symmetric: bool = True
    non_expert_bits: int = UNQUANTISED  # attention, shared experts, dense MLPs
    scales: str = "minmax"  # "mse": search each group's clipping range; "mlx": MLX's affine rule (module docstring)

    def __post_init__(self) -> None:
        if self.scales not in SCALES:
            raise MoescopeError(f"scales must be one of {', '.join(SCALES)}, not {self.scales!r}")
        if self.scales == "mlx" and self.symmetric:
            raise MoescopeError("scales \"mlx\" (MLX's affine rule) keeps an offset per group: it needs "
                                "asymmetric quantisation (--asymmetric; in a plan, \"symmetric\": false)")


def check_bits(bits: int, what: str = "bits") -> int:
    if bits == 0:
        raise MoescopeError(f"{what} = 0 means pruning the expert: use a prune plan, not a bit plan")
    if bits not in (*SUPPORTED_BITS, UNQUANTISED):
        raise MoescopeError(f"{what} = {bits} is not supported: use one of 2, 3, 4, 8 or 16 (unquantised)")
    return int(bits)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = True,
                  scales: str = "minmax") -> torch.Tensor:
    """`w` quantised to `bits` and dequantised, in groups of `group_size` along its last dimension,
    with minmax, MSE-searched or (asymmetric only) MLX's `scales`.

    Computed in float32 and returned in `w`'s dtype. 16 bits returns `w` itself.
    """
    import torch
    import torch.nn.functional as F

    if check_bits(bits) == UNQUANTISED:
        return w
    n = w.shape[-1]
    size = min(group_size, n)
    pad = -n % size
    x = w.reshape(-1, 1, n).to(torch.float32, copy=True)  # a private copy: the ops below work in place
    if pad:  # repeat the last input: min, max and absmax of the short last group stay its own
        x = F.pad(x, (0, pad), mode="replicate")
    x = x.view(x.shape[0], -1, size)
    shrink = 1.0
    if scales == "mse":  # each group's best factor first, then one rounding with it
        least = round_to_grid(x, bits, symmetric).sub_(x).square_().sum(-1, keepdim=True)
        shrink = torch.ones_like(least)
        for factor in SHRINK_FACTORS:
            error = round_to_grid(x, bits, symmetric, factor).sub_(x).square_().sum(-1, keepdim=True)
            better = error < least
            shrink.masked_fill_(better, factor)
            least = torch.where(better, error, least)
    x = round_to_mlx_grid(x, bits) if scales == "mlx" else round_to_grid(x, bits, symmetric, shrink, in_place=True)
    x = x.view(-1, n + pad)
    return (x[:, :n] if pad else x).reshape(w.shape).to(w.dtype)


def round_to_grid(x: torch.Tensor, bits: int, symmetric: bool, shrink: float | torch.Tensor = 1.0,
                  in_place: bool = False) -> torch.Tensor:
    """Groups `x` [..., group] rounded to their `bits` grid, its range `shrink` (a number, or one per
    group [..., 1]) times the group's own."""
    y = x if in_place else x.clone()
    if symmetric:
        scale = x.amax(-1, keepdim=True).maximum(-x.amin(-1, keepdim=True)).mul_(shrink).div_((2**bits - 1) / 2)
        scale.masked_fill_(scale == 0, 1.0)
        return y.div_(scale).round_().clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).mul_(scale)
    low = x.amin(-1, keepdim=True) * shrink
    scale = (x.amax(-1, keepdim=True) * shrink - low) / (2**bits - 1)
    scale.masked_fill_(scale == 0, 1.0)
    return y.sub_(low).div_(scale).round_().clamp_(0, 2**bits - 1).mul_(scale).add_(low)


def round_to_mlx_grid(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Groups `x` [..., group] rounded as `mlx.core.quantize` does in affine mode: the group's extreme
    of larger magnitude is kept exactly, and the step is adjusted so that zero lies on the grid
    (the other extreme may then be clipped by up to half a step)."""
    import torch

    levels = 2**bits - 1
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    low_wins = low.abs() > high.abs()
    scale = ((high - low) / levels).clamp_min_(1e-7)
    scale = torch.where(low_wins, scale, -scale)
    edge = torch.where(low_wins, low, high)
    steps = torch.round(edge / scale)
    scale = torch.where(steps != 0, edge / steps, scale)
    offset = torch.where(steps == 0, torch.zeros_like(edge), edge)
    return x.sub(offset).div_(scale).round_().clamp_(0, levels).mul_(scale).add_(offset)


@dataclass
class ExpertWeight:
    """One fused expert matrix: `view[e]` is expert e's weight, stored [out, in] or [in, out]."""

    name: str
    view: torch.Tensor = field(repr=False)  # [E, out, in] or [E, in, out], sharing the parameter's storage
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of one expert's matrix."""
        a, b = self.view.shape[1:]
        return (b, a) if self.transposed else (a, b)

    def fake_quantize_(self, experts: list[int], bits: int, options: QuantOptions) -> None:
        """Quantise the listed experts' slices in place, all at once (in chunks of bounded size)."""
        import torch

        step = max(1, CHUNK_ELEMENTS // self.view[0].numel())
        for start in range(0, len(experts), step):
            index = torch.tensor(experts[start : start + step], device=self.view.device)
            w = self.view[index]
            if self.transposed:
                w = w.transpose(1, 2)
            q = fake_quantize(w, bits, options.group_size, options.symmetric, options.scales)
            self.view[index] = q.transpose(1, 2) if self.transposed else q

    def squared_errors(self, bits: int, options: QuantOptions,
                       sensitivity: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of squared quantisation errors, each weighted by `sensitivity` [same shape as `view`]
        when given, and sum of squared weights) per expert, float64 [E]."""
        import torch

        errors, norms = [], []
        step = max(1, CHUNK_ELEMENTS // self.view[0].numel())
        for start in range(0, self.view.shape[0], step):
            w = self.view[start : start + step]
            f = None if sensitivity is None else sensitivity[start : start + step]
            if self.transposed:
                w, f = w.transpose(1, 2), None if f is None else f.transpose(1, 2)
            q = fake_quantize(w, bits, options.group_size, options.symmetric, options.scales)
            error = (q.float() - w.float()).square()
            errors.append((error if f is None else error * f).sum((1, 2)).double())
            norms.append(w.float().square().sum((1, 2)).double())
        return torch.cat(errors), torch.cat(norms)


def expert_weights(layer: MoELayer) -> list[ExpertWeight]:
    """The quantisable matrices of one MoE layer's experts (biases and vectors are left out)."""
    experts, count = layer.experts, layer.num_experts
    transposed_names = TRANSPOSED.get(type(layer.experts).__name__)
    weights = []
    for name, param in experts.named_parameters():
        if name.endswith("bias") or param.dim() < 2:
            continue
        if param.dim() == 3 and param.shape[0] == count:
            view = param.data
        elif param.dim() == 2 and param.shape[0] % count == 0:
            view = param.data.view(count, -1, param.shape[1])
        else:
            raise MoescopeError(f"cannot quantise {layer.path}.experts.{name} of shape {tuple(param.shape)}: "
                                f"expected [{count}, out, in] for {count} experts")
        transposed = name in transposed_names if transposed_names else bool(getattr(experts, "is_transposed", False))
        weights.append(ExpertWeight(name, view, transposed))
    if not weights:
        raise MoescopeError(f"{layer.path}.experts has no fused expert weights to quantise")
    return weights


def non_expert_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Linear layers quantised at `non_expert_bits`: all but routed experts, routers and the LM head."""
    from torch import nn

    from moescope.models import find_moe_layers

    skipped = {id(m) for layer in find_moe_layers(model) for part in (layer.experts, layer.router)
               for m in part.modules()}
    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in skipped and m is not head]


# ---------------------------------------------------------------- bit plans


@dataclass
class BitPlan:
    """Bits per expert for every MoE layer (decoder layer index -> one entry per expert)."""

    layers: dict[int, list[int]]
    model: dict[str, Any] = field(default_factory=dict)  # model_type, config_hash
    method: str = "uniform"
    group_size: int = 128
    symmetric: bool = True
    non_expert_bits: int = UNQUANTISED
    source: dict[str, Any] = field(default_factory=dict)
    scales: str = "minmax"

    @classmethod
    def made_with(cls, options: QuantOptions, layers: dict[int, list[int]], model: dict[str, Any], method: str,
                  source: dict[str, Any]) -> BitPlan:
        """A plan that quantises as `options` say."""
        return cls(layers, model, method, options.group_size, options.symmetric, options.non_expert_bits, source,
                   options.scales)

    @property
    def options(self) -> QuantOptions:
        return QuantOptions(self.group_size, self.symmetric, self.non_expert_bits, self.scales)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": "bit_plan",
                "model": {k: self.model.get(k) for k in ("model_type", "config_hash")},
                "method": self.method, "group_size": self.group_size, "symmetric": self.symmetric,
                "scales": self.scales, "non_expert_bits": self.non_expert_bits,
                "layers": {str(i): [int(b) for b in bits] for i, bits in sorted(self.layers.items())},
                "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> BitPlan:
        """A plan from its JSON form; MoescopeError on anything that is not a valid bit plan."""
        if not isinstance(data, dict) or data.get("kind") != "bit_plan":
            raise MoescopeError("not a bit plan: expected a JSON object with \"kind\": \"bit_plan\"")
        if data.get("format_version") != FORMAT_VERSION:
            raise MoescopeError(f"bit plan format_version {data.get('format_version')!r} is not supported "
                                f"(this moescope reads {FORMAT_VERSION})")
        if data.get("method") not in METHODS:
            raise MoescopeError(f"bit plan method {data.get('method')!r} is not one of {', '.join(METHODS)}")
        group_size, symmetric = data.get("group_size", 128), data.get("symmetric", True)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise MoescopeError(f"bit plan group_size must be a positive integer, not {group_size!r}")
        if not isinstance(symmetric, bool):
            raise MoescopeError(f"bit plan symmetric must be true or false, not {symmetric!r}")
        scales = data.get("scales", "minmax")  # plans written before the MSE search have none
        try:
            QuantOptions(group_size, symmetric, scales=scales)
        except MoescopeError as error:
            raise MoescopeError(f"bit plan: {error}") from None
        layers = data.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise MoescopeError("bit plan has no layers: expected {\"<layer index>\": [bits per expert, ...]}")
        parsed = {}
        for key, bits in layers.items():
            if not str(key).isdigit() or not isinstance(bits, list) or not bits:
                raise MoescopeError(f"bit plan layer {key!r}: expected a layer index and a list of bits per expert")
            for e, b in enumerate(bits):
                if not isinstance(b, int) or isinstance(b, bool):
                    raise MoescopeError(f"bit plan layer {key} expert {e}: bits must be an integer, not {b!r}")
                check_bits(b, f"bit plan layer {key} expert {e}: bits")
            parsed[int(key)] = list(bits)
        non_expert = data.get("non_expert_bits", UNQUANTISED)
        check_bits(non_expert if isinstance(non_expert, int) else -1, "bit plan non_expert_bits")
        return cls(parsed, dict(data.get("model") or {}), data["method"], group_size, symmetric, non_expert,
                   dict(data.get("source") or {}), scales)


def save_bit_plan(plan: BitPlan, path: str | Path) -> None:
    """Write the plan as JSON (to a temporary file first, then renamed: never a half-written plan)."""
    write_atomic(path, json.dumps(plan.to_dict(), indent=1) + "\n")


def load_bit_plan(path: str | Path, model: nn.Module | None = None) -> BitPlan:
    """Read and validate a bit plan; with `model`, also check that the plan was made for it."""
    plan = BitPlan.from_dict(read_json(path, "bit plan"))
    if model is not None:
        check_plan(plan, model)
    return plan


def model_info(model: nn.Module) -> dict[str, Any]:
    from moescope.profile import model_identity

    info = model_identity(model)[0]
    return {"model_type": info["model_type"], "config_hash": info["config_hash"]}


def check_plan(plan: BitPlan, model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers, after checking that `plan` covers exactly them; MoescopeError if not."""
    from moescope.models import find_moe_layers

    info = model_info(model)
    for key in ("model_type", "config_hash"):
        if plan.model.get(key) is not None and plan.model[key] != info[key]:
            raise MoescopeError(f"bit plan is for another model: {key} {plan.model[key]} in the plan, "
                                f"{info[key]} in the model")
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
    from moescope.models import find_moe_layers

    options = options or QuantOptions()
    check_bits(bits)
    layers = {layer.index: [bits] * layer.num_experts for layer in find_moe_layers(model)}
    return BitPlan.made_with(options, layers, model_info(model), "uniform", {"bits": bits})


def apply_bit_plan(model: nn.Module, plan: BitPlan) -> nn.Module:
    """Fake-quantise `model` in place as `plan` says (experts sharing a bit width in one op); returns it."""
    import torch

    options = plan.options
    with torch.no_grad():
        for layer in check_plan(plan, model):
            bits = plan.layers[layer.index]
            for weight in expert_weights(layer):
                for b in sorted(set(bits) - {UNQUANTISED}):
                    weight.fake_quantize_([e for e, x in enumerate(bits) if x == b], b, options)
        if options.non_expert_bits != UNQUANTISED:
            for _, linear in non_expert_linears(model):
                linear.weight.data.copy_(fake_quantize(linear.weight.data, options.non_expert_bits,
                                                       options.group_size, options.symmetric, options.scales))
    return model


# ---------------------------------------------------------------- distortion and allocation


def layer_weight_distortion(layer: MoELayer, bits: tuple[int, ...], options: QuantOptions,
                            relative: bool = True) -> np.ndarray:
    """||W - Q(W)||^2 (over ||W||^2 if `relative`) of each expert of one layer, all its matrices
    together, [experts, bits]."""
    import torch

    out = np.zeros((layer.num_experts, len(bits)))
    with torch.no_grad():
        for k, b in enumerate(bits):
            errors = norms = 0
            for weight in expert_weights(layer):
                err, norm = weight.squared_errors(b, options)
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
    from moescope.models import find_moe_layers

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
    import torch

    from moescope.models import find_moe_layers

    options = options or QuantOptions()
    layers = find_moe_layers(model)
    if len({layer.num_experts for layer in layers}) > 1:
        raise MoescopeError("layers with different expert counts: allocate per group of equal layers instead")
    named = [(layer, w, dict(layer.experts.named_parameters())[w.name]) for layer in layers
             for w in expert_weights(layer)]
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
                out[row[layer.index], :, k] += 0.5 * weight.squared_errors(b, options, sensitivity)[0].cpu().numpy()
    return out


def expert_outputs(layer: MoELayer, hidden: torch.Tensor, token: torch.Tensor, experts: torch.Tensor,
                   chunk: int) -> torch.Tensor:
    """f_e(hidden[t]) in float32 for each slot (t, e): the experts module called with one expert at weight 1."""
    import torch

    one = torch.ones(1, 1, dtype=hidden.dtype, device=hidden.device)
    return torch.cat([layer.experts(hidden[t], e[:, None], one.expand(len(e), 1)).float()
                      for t, e in zip(token.split(chunk), experts.split(chunk), strict=True)])


def per_expert(values: torch.Tensor, experts: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of `values` per expert id, float64 [count] on the CPU."""
    import torch

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
    import torch

    from moescope.models import find_moe_layers

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
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()

    out = np.zeros((len(layers), layers[0].num_experts, len(bits)))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hidden, ids = (torch.cat(parts) for parts in zip(*inputs.pop(layer.index), strict=True))
            experts = ids.flatten().long()  # one slot per (token, rank)
            token = torch.arange(len(hidden), device=hidden.device).repeat_interleave(ids.shape[1])
            slots = (hidden, token, experts, chunk)
            reference = expert_outputs(layer, *slots)
            energy = per_expert(reference.square().sum(-1), experts, layer.num_experts)
            scale = energy if relative else per_expert(torch.ones(len(experts)), experts, layer.num_experts)
            weights = expert_weights(layer)
            saved = [weight.view.clone() for weight in weights]
            for k, b in enumerate(bits):
                try:
                    for weight in weights:
                        weight.fake_quantize_(list(range(layer.num_experts)), b, options)
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


def allocate_bits(importance: np.ndarray, distortion: np.ndarray, cost: np.ndarray, budget: float) -> np.ndarray:
    """Choose one option per expert minimising sum(importance * distortion) with sum(cost) <= budget.

    importance [L, E] (any non-negative weights), distortion and cost [L, E, K] (cost may broadcast).
    Returns the chosen option index per expert, [L, E]. Each expert starts at its cheapest option;
    upgrades along the lower convex hull of its (cost, loss) options are taken in decreasing order
    of loss saved per unit cost, skipping (and closing) an expert whose next upgrade no longer fits.
    Only upgrades that fit are taken, so the result is always within budget; it is the Lagrangian
    optimum at the multiplier where the budget binds, plus whatever else still fits.
    """
    importance = np.asarray(importance, dtype=np.float64)
    distortion = np.asarray(distortion, dtype=np.float64)
    cost = np.broadcast_to(np.asarray(cost, dtype=np.float64), distortion.shape)
    if importance.shape != distortion.shape[:-1]:
        raise MoescopeError(f"importance {importance.shape} does not match distortion {distortion.shape[:-1]}")
    if not (np.isfinite(importance).all() and np.isfinite(distortion).all()) or (importance < 0).any():
        raise MoescopeError("importance must be finite and non-negative, and distortion finite")
    loss = (importance[..., None] * distortion).reshape(-1, distortion.shape[-1])
    cost = cost.reshape(loss.shape)
    choice = np.lexsort((loss, cost), axis=-1)[:, 0]  # cheapest option, the better one on ties
    items = np.arange(len(loss))
    spent = cost[items, choice].sum()
    if spent > budget:
        raise MoescopeError(f"budget {budget:g} is below the minimum possible {spent:g} "
                            f"(every expert at its cheapest option)")
    steps = []  # (saving per unit cost, item, step number, option, extra cost)
    for item in items:
        at, number = choice[item], 0
        while True:
            up = (cost[item] > cost[item, at]) & (loss[item] <= loss[item, at])
            if not up.any():
                break
            rate = np.where(up, (loss[item, at] - loss[item]) / np.where(up, cost[item] - cost[item, at], 1), -1)
            best = np.flatnonzero(rate == rate.max())
            nxt = best[np.argmin(cost[item, best])]  # on equal rates the smaller step: finer budget fit
            steps.append((rate[nxt], item, number, nxt, cost[item, nxt] - cost[item, at]))
            at, number = nxt, number + 1
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    closed = set()
    for _, item, _, option, extra in steps:
        if item in closed:
            continue
        if spent + extra <= budget:
            choice[item], spent = option, spent + extra
        else:
            closed.add(item)
    return choice.reshape(importance.shape)


def expert_params(model: nn.Module) -> np.ndarray:
    """Quantisable weights per expert of each MoE layer, [MoE layers]."""
    from moescope.models import find_moe_layers

    return np.array([sum(math.prod(w.shape) for w in expert_weights(layer)) for layer in find_moe_layers(model)])


def budget_plan(model: nn.Module, importance: np.ndarray, distortion: np.ndarray,
                bits: tuple[int, ...] = SUPPORTED_BITS, *, avg_bits: float | None = None,
                max_bytes: float | None = None, options: QuantOptions | None = None, per_layer: bool = False,
                source: dict | None = None) -> BitPlan:
    """The plan minimising sum(importance * distortion) within `avg_bits` (mean bits per expert
    weight, scales not counted) or `max_bytes` (the whole packed model, as `memory_estimate`).

    importance [MoE layers, experts]; distortion [MoE layers, experts, len(bits)] (`weight_distortion`).
    `per_layer` gives all experts of a layer one width (what runtimes can serve), chosen for the
    same objective and budget.
    """
    from moescope.models import find_moe_layers

    options = options or QuantOptions()
    if (avg_bits is None) == (max_bytes is None):
        raise MoescopeError("give exactly one budget: average bits or a size in bytes")
    for b in bits:
        check_bits(b)
    layers = find_moe_layers(model)
    bits_array = np.array(bits, dtype=np.float64)
    distortion = np.asarray(distortion, dtype=np.float64)
    expected = (len(layers), layers[0].num_experts, len(bits))
    if distortion.shape != expected:
        raise MoescopeError(f"distortion has shape {distortion.shape}; this model and {len(bits)} bit options "
                            f"need {expected}")
    if avg_bits is not None:
        params = expert_params(model).astype(np.float64)[:, None, None]
        cost = np.broadcast_to(params * bits_array, distortion.shape)
        budget = avg_bits * params.sum() * expected[1]
        lowest, what = f"{bits_array.min():g} average bits", f"{avg_bits:g} average bits"
    else:
        cost = np.array([[sum(matrix_bytes(*w.shape, b, options) for w in expert_weights(layer)) for b in bits]
                         for layer in layers], dtype=np.float64)[:, None, :]
        cost = np.broadcast_to(cost, distortion.shape)
        fixed = memory_estimate(model, uniform_plan(model, UNQUANTISED, options))
        fixed_bytes = fixed.non_expert_bytes + fixed.other_bytes
        budget = max_bytes - fixed_bytes
        lowest, what = format_bytes(fixed_bytes + cost.min(-1).sum()), format_bytes(max_bytes)
    if cost.min(-1).sum() > budget:
        raise MoescopeError(f"budget {what} is below the minimum possible {lowest} (every expert at "
                            f"{min(bits)} bits)")
    if per_layer:  # one item per layer: its experts' summed loss and cost
        loss = (np.asarray(importance, dtype=np.float64)[..., None] * distortion).sum(1, keepdims=True)
        choice = allocate_bits(np.ones(loss.shape[:2]), loss, cost.sum(1, keepdims=True), budget)
        choice = np.broadcast_to(choice, expected[:2])
    else:
        choice = allocate_bits(importance, distortion, cost, budget)
    plan = {layer.index: [int(bits_array[k]) for k in row] for layer, row in zip(layers, choice, strict=True)}
    source = {"avg_bits": avg_bits, "max_bytes": max_bytes, "per_layer": per_layer, **(source or {})}
    return BitPlan.made_with(options, plan, model_info(model), "budget", source)


# ---------------------------------------------------------------- memory


def matrix_bytes(out_features: int, in_features: int, bits: int, options: QuantOptions) -> int:
    """Bytes of one [out, in] matrix packed at `bits`: the codes plus an fp16 scale (and offset) per group."""
    if bits == UNQUANTISED:
        return out_features * in_features * 2
    groups = out_features * math.ceil(in_features / options.group_size)
    return math.ceil(out_features * in_features * bits / 8) + groups * (2 if options.symmetric else 4)


@dataclass
class MemoryEstimate:
    """Bytes the really packed model would take (everything not quantised counted as bf16)."""

    expert_bytes: int
    non_expert_bytes: int  # linear layers outside the routed experts, at non_expert_bits
    other_bytes: int  # embeddings, LM head, norms, routers, biases
    bf16_bytes: int  # the whole model in bf16
    expert_bits: float  # mean bits per expert weight (scales not counted)

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.non_expert_bytes + self.other_bytes

    def format(self) -> str:
        return (f"packed size {format_bytes(self.total_bytes)} vs {format_bytes(self.bf16_bytes)} in bf16 "
                f"({self.total_bytes / self.bf16_bytes:.1%}): experts {format_bytes(self.expert_bytes)} at "
                f"{self.expert_bits:.2f} average bits, other linear {format_bytes(self.non_expert_bytes)}, "
                f"rest {format_bytes(self.other_bytes)}")


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return ""


def memory_estimate(model: nn.Module, plan: BitPlan) -> MemoryEstimate:
    """The packed size of `model` under `plan` (only shapes are read: a meta-device model works)."""
    options = plan.options
    expert_bytes = expert_bits = expert_count = 0
    counted = set()
    for layer in check_plan(plan, model):
        counted.update(id(p) for p in layer.experts.parameters())
        for weight in expert_weights(layer):
            out_f, in_f = weight.shape
            for b in plan.layers[layer.index]:
                expert_bytes += matrix_bytes(out_f, in_f, b, options)
                expert_bits += b * out_f * in_f
                expert_count += out_f * in_f
        expert_bytes += sum(p.numel() * 2 for n, p in layer.experts.named_parameters() if n.endswith("bias"))
    non_expert_bytes = 0
    for _, linear in non_expert_linears(model):
        counted.add(id(linear.weight))
        non_expert_bytes += matrix_bytes(*linear.weight.shape, options.non_expert_bits, options)
    params = list(model.parameters())
    other_bytes = sum(p.numel() * 2 for p in params if id(p) not in counted)
    return MemoryEstimate(expert_bytes, non_expert_bytes, other_bytes, sum(p.numel() * 2 for p in params),
                          expert_bits / expert_count)


# ---------------------------------------------------------------- importance and measured distortion

IMPORTANCE = {"frequency": "selections", "gate-mass": "weight_sum", "gate-energy": "weight_sq",
              "saliency": "saliency_sum"}  # importance kind -> the profile counter it is read from


def profile_importance(profile, kind: str) -> np.ndarray:
    """Importance per expert [MoE layers, experts] from a `moescope.stats.Profile`, summed over
    phases and domains: selections (frequency) and the sum of routing weights (gate mass) as
    `moescope plan` scores them, the sum of their squares (gate energy: what scales an expert's
    output error) or REAP saliency summed over tokens (frequency x the mean `plan` uses)."""
    from moescope.plan import profile_scores

    if kind in ("frequency", "gate-mass"):
        return profile_scores(profile, kind)
    name = IMPORTANCE[kind]
    if name not in profile.counters:
        raise MoescopeError(f"the profile has no {name} counter for --importance {kind}: profile again with --{kind}")
    return profile.real(name).sum(axis=0)


def load_profile_for(model: nn.Module, profile_dir: str | Path):
    """The profile at `profile_dir`, after checking it was made on this model."""
    from moescope.stats import Profile

    profile = Profile.load(profile_dir)
    info = model_info(model)
    for key in ("model_type", "config_hash"):
        if profile.model.get(key) != info[key]:
            raise MoescopeError(f"profile {profile_dir} is of another model: {key} {profile.model.get(key)} "
                                f"in the profile, {info[key]} in the model")
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
    distortion, described = measured_distortion(model, choices, options, calibration, tokenizer, tokens, fisher)
    source = {"importance": kind, "bit_choices": list(choices), "distortion": described}
    if fisher:
        return np.ones(distortion.shape[:2]), distortion, source
    profile = load_profile_for(model, profile_dir)
    source |= {"profile": str(profile_dir), "calibration_hash": profile.calibration_hash}
    return profile_importance(profile, kind), distortion, source


def measured_distortion(model: nn.Module, choices: tuple[int, ...], options: QuantOptions,
                        calibration: str | None = None, tokenizer=None, tokens: int = 16384,
                        fisher: bool = False) -> tuple[np.ndarray, str]:
    """(distortion [MoE layers, experts, choices], what it is): the Fisher-weighted weight error on
    `calibration` with `fisher`, else the absolute squared output error on `calibration` windows when
    given, else the absolute squared weight error (absolute errors pair with gate-energy importance;
    see `weight_distortion`)."""
    from moescope.calibration import calibration_windows
    from moescope.loading import prompt_room

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
