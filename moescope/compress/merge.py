"""Merge experts: measure how alike they are, fold each group into one expert, and give the folded
expert a router row that sends it what its group received.

Similarity (for `moescope plan merge`), measured on calibration tokens at each MoE layer's input:
- outputs: cosine of the experts' outputs on the same tokens, every expert run on every token
  (the default; a functional comparison, token by token);
- mean-output: cosine of each expert's output averaged over the tokens (HC-SMoE's paper);
- router-logits: cosine of the router's logit columns (M-SMoE's paper: experts the router scores alike).

Weights: each expert tensor of a group is replaced by the usage-weighted average of its members'
tensors (biases too), written in the checkpoint's own layout, tensor by tensor: per-expert keys
renumbered, fused tensors folded along the expert axis. Experts trained apart number their hidden
neurons arbitrarily, so averaging them neuron by neuron mixes unrelated neurons; before averaging,
each member's neurons are permuted to match the first (most used) member's, by an optimal assignment
on the similarity of their weight rows (M-SMoE's alignment; a permutation does not change what an
expert computes). Alignment needs to tell the neuron axis from the shapes: per-expert tensors whose
hidden size differs from the expert width. Fused on-disk layouts (gpt-oss) are averaged unaligned;
the checkpoint's metadata lists the aligned layers.

Router rows. A softmax router gives a group of experts the mass sum_e exp(z_e) / Z, that is the
logit log-sum-exp(z_e over the group). No single linear row produces a log-sum-exp of linear
functions, so moescope fits one: the least-squares row (and logit bias, where the router has one)
whose logit is closest to the group's log-sum-exp over the calibration tokens (`fit`, the default).
The alternative `mean` takes the usage-weighted mean of the members' rows, which keeps the group's
typical logit but not its mass (up to log(group size) short). Experts left alone keep their rows
bit for bit. Both are measured on the calibration tokens, layer by layer, and the report says how
far each falls from the original routing (`moescope.compress.routing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moescope.analysis.merging import linear_assignment
from moescope.backends.hf.capture import run_experts
from moescope.checkpoints import check_checkpoint_dir, read_config, shapes
from moescope.compress.checkpoint import rewrite_checkpoint
from moescope.compress.routing import (
    RouterIO,
    agreement,
    check_linear_router,
    linear_logits,
    router_parameters,
)
from moescope.errors import MoescopeError
from moescope.models.base import MoELayer
from moescope.models.layout import (
    HIDDEN_SIZE_KEYS,
    ROUTER_LOGIT_BIAS,
    classify_key,
    dict_value,
    per_expert_view,
    set_expert_count,
)
from moescope.models.registry import find_moe_layers
from moescope.plans import MergePlan

SIMILARITIES = ("outputs", "mean-output", "router-logits")
ROUTER_RULES = ("fit", "mean")


def cosine(vectors: torch.Tensor) -> np.ndarray:
    """Pairwise cosine similarity [E, E] of the rows of `vectors` [E, d]."""
    unit = vectors.double() / vectors.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit.T).numpy()


@torch.no_grad()
def layer_similarity(layer: MoELayer, io: RouterIO, kind: str, chunk: int = 256) -> np.ndarray:
    """How alike the experts of one layer are, [E, E] (see the module docstring for `kind`)."""
    if kind == "router-logits":
        return cosine(io.logits.T)
    device, dtype = next(layer.experts.parameters()).device, next(layer.experts.parameters()).dtype
    experts = layer.num_experts
    gram = torch.zeros(experts, experts, dtype=torch.float64)
    total = torch.zeros(experts, io.inputs.shape[1], dtype=torch.float64)
    for start in range(0, io.inputs.shape[0], chunk):
        hidden = io.inputs[start:start + chunk].to(device=device, dtype=dtype)
        outputs = torch.stack([run_experts(layer, hidden, torch.full((hidden.shape[0], 1), e, dtype=torch.long))
                               for e in range(experts)]).float()  # [E, tokens, H], on the model's device
        flat = outputs.flatten(1)
        gram += (flat @ flat.T).double().cpu()
        total += outputs.sum(1).double().cpu()
    if kind == "mean-output":
        return cosine(total)
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    return (gram / norms[:, None] / norms[None, :]).numpy()


def expert_similarity(model, captured: dict[int, RouterIO], kind: str = "outputs") -> dict[int, np.ndarray]:
    """Each MoE layer's expert similarity [E, E] on the captured calibration tokens."""
    if kind not in SIMILARITIES:
        raise MoescopeError(f"unknown similarity {kind!r}; choose one of {', '.join(SIMILARITIES)}")
    return {layer.index: layer_similarity(layer, captured[layer.index], kind) for layer in find_moe_layers(model)}


@dataclass
class MergedRouter:
    """Fitted router rows for one layer's merged experts (only groups of two or more are used)."""

    weight: torch.Tensor  # [G, H] float32
    bias: torch.Tensor | None  # [G] float32, where the router has a logit bias
    report: dict = field(default_factory=dict)  # rule -> agreement and divergence on the calibration tokens


def fold(view: torch.Tensor, groups: list[list[int]], weights: list[list[float]]) -> torch.Tensor:
    """[E, ...] -> [G, ...]: each group's usage-weighted average, computed in float32, in `view`'s dtype."""
    merged = [sum(w * view[e].float() for e, w in zip(group, shares)) for group, shares in zip(groups, weights)]
    return torch.stack(merged).to(view.dtype)


def least_squares(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """argmin_B ||inputs @ B - targets||^2 (float64 normal equations, a tiny ridge for rank-deficient inputs)."""
    x, y = inputs.double(), targets.double()
    gram = x.T @ x
    ridge = 1e-10 * float(gram.diagonal().mean()) + 1e-30
    return torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ y).float()


def fit_router(layer: MoELayer, io: RouterIO, plan: MergePlan) -> MergedRouter:
    """The least-squares rows for one layer's groups, and both rules measured on the calibration tokens."""
    check_linear_router(layer, io)
    weight, bias = (p.detach().float().cpu() if p is not None else None for p in router_parameters(layer))
    groups, shares = plan.groups[layer.index], plan.weights[layer.index]
    targets = torch.tensor(plan.targets(layer.index))
    wanted = layer.family.mapped_logits(io.logits, targets, len(groups))  # [n, G] the groups' log-sum-exp
    inputs = io.inputs if bias is None else torch.cat([io.inputs, torch.ones(len(io.inputs), 1)], 1)
    solved = least_squares(inputs, wanted)  # [H (+1), G]
    fitted_weight, fitted_bias = solved[: weight.shape[1]].T, (solved[-1] if bias is not None else None)
    single = [g[0] for g in groups if len(g) == 1]
    keep = [i for i, g in enumerate(groups) if len(g) == 1]
    fitted_weight[keep] = weight[single]
    if bias is not None:
        fitted_bias[keep] = bias[single]
    rules = {"fit": (fitted_weight, fitted_bias),
             "mean": (fold(weight, groups, shares), fold(bias[:, None], groups, shares)[:, 0] if bias is not None
                      else None)}
    report = {}
    for rule, (rows, row_bias) in rules.items():
        logits = linear_logits(io.inputs, rows, row_bias)
        chosen = logits.topk(layer.top_k, dim=-1).indices
        report[rule] = {"agreement": agreement(io.chosen, chosen, targets),
                        "divergence": float(layer.family.routing_divergence(logits, wanted))}
    return MergedRouter(fitted_weight, fitted_bias, report)


def fit_routers(model, captured: dict[int, RouterIO], plan: MergePlan) -> dict[int, MergedRouter]:
    """Fitted rows for every MoE layer of `model` (the source model, loaded) that the plan covers."""
    return {layer.index: fit_router(layer, captured[layer.index], plan) for layer in find_moe_layers(model)
            if layer.index in plan.num_experts}


def expert_templates(plan: MergePlan, info: dict, tensor_shapes: dict[str, tuple]) -> dict[int, dict[str, tuple]]:
    """Per MoE layer, each per-expert tensor name (with `{}` for the expert number) and its shape; refuses a
    checkpoint that lacks one of them for some expert, since that expert's group could never be complete."""
    seen: dict[tuple[int, str], set[int]] = {}
    templates: dict[int, dict[str, tuple]] = {}
    for name, shape in tensor_shapes.items():
        where = info[name]
        if where.kind == "expert":
            template = name.replace(f".experts.{where.expert}.", ".experts.{}.", 1)
            seen.setdefault((where.layer, template), set()).add(where.expert)
            templates.setdefault(where.layer, {})[template] = tuple(shape)
    for (layer, template), experts in seen.items():
        if experts != set(range(plan.num_experts[layer])):
            raise MoescopeError(f"the checkpoint lacks {template.format('N')} for some experts of layer {layer}: "
                                "cannot merge it")
    return templates


def intermediate_axes(templates: dict[str, tuple], hidden: int | None) -> dict[str, int | None] | None:
    """Which axis of each per-expert tensor runs over the expert's hidden neurons: in every matrix, the axis
    whose size is not the model's `hidden` size (gate/up [I, H], down [H, I]). None when that cannot be
    told (hidden size unknown, I == H, or matrices of other shapes): such layers are averaged unaligned."""
    matrices = [shape for shape in templates.values() if len(shape) == 2]
    if not hidden or not matrices or any(shape.count(hidden) != 1 for shape in matrices):
        return None
    inner = {a if b == hidden else b for a, b in matrices}
    if len(inner) != 1:
        return None
    size = inner.pop()
    return {template: shape.index(size) if size in shape else None for template, shape in templates.items()}


def aligned_fold(tensors: dict[tuple[str, int], torch.Tensor], group: list[int], shares: list[float],
                 axes: dict[str, int | None] | None) -> dict[str, torch.Tensor]:
    """One group's per-expert tensors (template, expert) -> template -> merged tensor. With `axes`, each
    member's hidden neurons are first permuted to best match the first member's (weight matching over
    the concatenated rows of its matrices: a permutation leaves the expert's function unchanged)."""
    templates = sorted({template for template, _ in tensors})
    tensors = dict(tensors)
    if axes and len(group) > 1:
        matched = [t for t in templates if axes[t] is not None and tensors[(t, group[0])].dim() == 2]

        def features(expert: int) -> torch.Tensor:
            rows = torch.cat([tensors[(t, expert)].float().movedim(axes[t], 0) for t in matched], dim=1)
            return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)

        anchor = features(group[0])
        for expert in group[1:]:
            perm = torch.from_numpy(linear_assignment(-(anchor @ features(expert).T).double().numpy()))
            for t in templates:
                if axes[t] is not None:
                    tensors[(t, expert)] = tensors[(t, expert)].index_select(axes[t], perm)
    single = [list(range(len(group)))]
    return {t: fold(torch.stack([tensors[(t, e)] for e in group]), single, [shares])[0] for t in templates}


def merge_edit(plan: MergePlan, tensor_shapes: dict[str, tuple], routers: dict[int, MergedRouter] | None,
               hidden: int | None = None):
    """(edit, config_edit, aligned layers) that write `plan` into a checkpoint: per-expert tensors are held
    until their group is complete, then written once under the merged expert's number (aligned first where
    the model's `hidden` size is given and the layout allows it); `routers` None: mean router rows."""
    info = {name: classify_key(name, shape, plan.num_experts) for name, shape in tensor_shapes.items()}
    templates = expert_templates(plan, info, tensor_shapes)
    axes = {layer: intermediate_axes(shapes, hidden) for layer, shapes in templates.items()}
    counts = {plan.merged_count(layer) for layer in plan.num_experts}
    if len(counts) > 1:
        raise MoescopeError(f"merging needs the same number of experts left in every MoE layer (the config holds one "
                            f"expert count), this plan leaves {sorted(counts)}")
    targets = {layer: plan.targets(layer) for layer in plan.num_experts}
    held: dict[tuple[int, int], dict[tuple[str, int], torch.Tensor]] = {}

    def router_rows(name: str, tensor: torch.Tensor, layer: int) -> torch.Tensor:
        groups, shares = plan.groups[layer], plan.weights[layer]
        merged = fold(tensor, groups, shares)
        router = routers.get(layer) if routers else None
        if router is None or (tensor.dim() == 1 and not ROUTER_LOGIT_BIAS.search(name)):
            return merged  # mean rows, and correction biases (they shift the choice, not the logit)
        rows = router.weight if tensor.dim() == 2 else router.bias
        if rows is None or rows.shape[1:] != tensor.shape[1:]:
            raise MoescopeError(f"{name}: the fitted router rows do not match its shape {tuple(tensor.shape)}")
        for index, group in enumerate(groups):
            if len(group) > 1:
                merged[index] = rows[index].to(tensor.dtype)
        return merged

    def edit(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        where = info[name]
        if where.layer not in plan.num_experts or where.kind == "other":
            return [(name, tensor)]
        if not tensor.is_floating_point() or tensor.element_size() < 2:
            raise MoescopeError(f"{name} is stored as {tensor.dtype}: merging needs unquantised expert weights")
        if where.kind == "router":
            return [(name, router_rows(name, tensor, where.layer))]
        if where.kind == "fused":
            merged = fold(per_expert_view(tensor, plan.num_experts[where.layer]), plan.groups[where.layer],
                          plan.weights[where.layer])
            return [(name, merged.reshape(-1, *tensor.shape[1:]) if merged.dim() > tensor.dim() else merged)]
        index = targets[where.layer][where.expert]
        waiting = held.setdefault((where.layer, index), {})
        waiting[(name.replace(f".experts.{where.expert}.", ".experts.{}.", 1), where.expert)] = tensor
        group = plan.groups[where.layer][index]
        if len(waiting) < len(group) * len(templates[where.layer]):
            return []
        merged = aligned_fold(held.pop((where.layer, index)), group, plan.weights[where.layer][index],
                              axes[where.layer])
        return [(template.format(index), value) for template, value in merged.items()]

    def config_edit(config: dict) -> dict:
        return set_expert_count(config, next(iter(counts)))

    return edit, config_edit, sorted(layer for layer, found in axes.items() if found)


def merge_checkpoint(source: str | Path, out: str | Path, plan: MergePlan, routers: dict[int, MergedRouter] | None,
                     rule: str = "fit", overwrite: bool = False, align: bool = True) -> Path:
    """Write a merged copy of `source` to `out`; the plan, the router rule and its measured fit go into
    the safetensors metadata."""
    if rule not in ROUTER_RULES:
        raise MoescopeError(f"unknown router rule {rule!r}; choose one of {', '.join(ROUTER_RULES)}")
    if rule == "fit" and routers is None:
        raise MoescopeError("the fit router rule needs rows fitted on calibration tokens (fit_routers)")
    source = check_checkpoint_dir(source)
    hidden = dict_value(read_config(source), HIDDEN_SIZE_KEYS) if align else None
    edit, config_edit, aligned = merge_edit(plan, shapes(source), routers if rule == "fit" else None, hidden)
    metadata = {"method": "merge", "router_rule": rule, "aligned_layers": aligned, "plan": plan.to_json(),
                "router_fit": {str(layer): r.report for layer, r in (routers or {}).items()}}
    return rewrite_checkpoint(source, out, edit, config_edit=config_edit, metadata=metadata,
                              description="merge", overwrite=overwrite)
