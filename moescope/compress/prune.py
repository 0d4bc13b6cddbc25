"""Expert pruning that really prunes: five methods, run-time masks, measured ablation and replay verification.

Methods (see docs/pruning.md):
- mask: the expert can never be chosen. At run time a -inf logit (`routing_offsets`); in a checkpoint,
  a large negative router bias where the router has one (gpt-oss logit bias, DeepSeek-V3-style
  correction bias), so the result loads with stock transformers.
- remove: structural. The expert's tensors and router row are sliced out and the config's expert
  count lowered. For softmax-then-top-k routers this equals a -inf mask exactly.
- zero: the expert's weights are zeroed; routing is untouched, so tokens still spend a top-k slot on it.
- soft: the expert's logit is lowered by `offset` (logit space, so the effect does not depend on the
  sign of the activations, unlike scaling a router row).
- row-1e9: the seeds' method, kept as a documented experiment: the router row is set to -1e9, so
  the logit becomes -1e9 * sum(h) and the expert is still chosen whenever sum(h) < 0.
- merge: each group of a merge plan folds into one expert (moescope.compress.merge).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moescope.backends.hf.loading import input_device, load_tokenizer
from moescope.backends.select import is_mlx_layout, routing_capture
from moescope.calibration import encode, load_calibration, padded
from moescope.checkpoints import check_checkpoint_dir, read_config, shapes
from moescope.compress.checkpoint import rewrite_checkpoint
from moescope.compress.merge import MergedRouter, merge_checkpoint
from moescope.errors import MoescopeError
from moescope.models.layout import ROUTER_LOGIT_BIAS, classify_key, per_expert_view, set_expert_count, text_config
from moescope.models.mlx_layout import packed_switches
from moescope.models.registry import find_moe_layers
from moescope.plans import MergePlan, PrunePlan

METHODS = ("mask", "remove", "zero", "soft", "row-1e9", "merge")
MLX_LAYOUT_METHODS = ("remove", "mask")  # packed codes: zeroing or editing router rows would not do what it says
CHECKPOINT_MASK_BIAS = -1e4  # far below any logit or score, and representable in bf16 and fp16


def offsets_for(plan: PrunePlan, value: float = float("-inf")) -> dict[int, torch.Tensor]:
    """Per-layer logit offsets [E]: `value` for pruned experts, 0 for the rest."""
    offsets = {}
    for layer, pruned in plan.prune.items():
        offset = torch.zeros(plan.num_experts[layer])
        offset[pruned] = value
        offsets[layer] = offset
    return offsets


@contextmanager
def routing_offsets(model, offsets: dict[int, torch.Tensor]) -> Iterator[None]:
    """Run `model` as if offsets[layer] were added to each router's logits (-inf: a run-time mask).

    An offset is [E] for every token, or [batch rows, E] for a different mask per row (ablation
    runs many single-expert masks in one batch).
    """
    config = text_config(model.config)
    handles = []
    try:
        for layer in find_moe_layers(model):
            if layer.index in offsets:
                def hook(module, args, output, layer=layer, offset=offsets[layer.index]):
                    logits = layer.family.router_logits(output)
                    offset = offset.to(logits.device)
                    if offset.dim() == 2:
                        offset = offset.repeat_interleave(logits.shape[0] // offset.shape[0], dim=0)
                    return layer.family.reroute(output, layer, config, offset)

                handles.append(layer.router.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def checkpoint_edit(plan: PrunePlan, method: str, tensor_shapes: dict[str, tuple], offset: float = 0.0):
    """(edit, config_edit) that write `method` into a checkpoint; MoescopeError where it cannot be."""
    info = {name: classify_key(name, shape, plan.num_experts) for name, shape in tensor_shapes.items()}
    router_biases = {i.layer: name for name, i in info.items() if i.kind == "router" and len(tensor_shapes[name]) == 1}
    if method in ("mask", "soft"):
        usable = router_biases if method == "mask" else {
            layer: name for layer, name in router_biases.items() if ROUTER_LOGIT_BIAS.search(name)}
        missing = sorted(set(plan.prune) - set(usable))
        if missing:
            what = "router bias" if method == "mask" else "router logit bias"
            raise MoescopeError(
                f"`{method}` cannot be written into this checkpoint: the router of layer {missing[0]} has no "
                f"{what}. Use --method remove (a structural mask), or evaluate it at run time with "
                f"moescope.compress.prune.routing_offsets(model, offsets_for(plan))")
    if method == "remove":
        counts = {len(plan.kept(layer)) for layer in plan.num_experts}
        if len(counts) > 1:
            raise MoescopeError("remove needs the same number of experts kept in every MoE layer (the config holds "
                                f"one expert count), this plan keeps {sorted(counts)}: use --method mask or a plan "
                                "with one ratio for all layers")
    renumber = {layer: {old: new for new, old in enumerate(plan.kept(layer))} for layer in plan.num_experts}

    def edit(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        where = info[name]
        pruned = plan.prune.get(where.layer, [])
        if not pruned or where.kind == "other":
            return [(name, tensor)]
        experts = plan.num_experts[where.layer]
        if method == "remove":
            if where.kind == "expert":
                if where.expert in pruned:
                    return []
                new = renumber[where.layer][where.expert]
                return [(name.replace(f".experts.{where.expert}.", f".experts.{new}.", 1), tensor)]
            kept = plan.kept(where.layer)
            sliced = per_expert_view(tensor, experts)[kept]
            return [(name, sliced.reshape(-1, *tensor.shape[1:]) if sliced.shape[0] != len(kept) else sliced)]
        if method == "zero" and where.kind in ("expert", "fused"):
            if where.kind == "expert":
                return [(name, torch.zeros_like(tensor) if where.expert in pruned else tensor)]
            zeroed = tensor.clone()
            per_expert_view(zeroed, experts)[pruned] = 0
            return [(name, zeroed)]
        if where.kind == "router":
            changed = tensor.clone()
            if method == "row-1e9" and tensor.dim() == 2:
                changed[pruned] = -1e9
            elif method == "mask" and name == router_biases.get(where.layer):
                changed[pruned] = CHECKPOINT_MASK_BIAS
            elif method == "soft" and name == router_biases.get(where.layer):
                changed[pruned] -= offset
            else:
                return [(name, tensor)]
            return [(name, changed)]
        return [(name, tensor)]

    def config_edit(config: dict) -> dict:
        if method == "remove":
            return set_expert_count(config, len(plan.kept(next(iter(plan.num_experts)))))
        return config

    return edit, config_edit


def check_method(plan: PrunePlan | MergePlan, method: str) -> None:
    """Refuse an unknown method, and a merge plan with any method but merge (and the reverse)."""
    if method not in METHODS:
        raise MoescopeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(plan, MergePlan) != (method == "merge"):
        raise MoescopeError("--method merge applies a merge plan (from `moescope plan merge`); a merge plan is "
                            "applied only with --method merge")


def prune_checkpoint(source: str | Path, out: str | Path, plan: PrunePlan | MergePlan, method: str,
                     offset: float = 0.0, overwrite: bool = False, routers: dict[int, MergedRouter] | None = None,
                     router_rule: str = "fit", align: bool = True) -> Path:
    """Write a pruned (or, with a merge plan and `method` "merge", merged) copy of `source` to `out`; the
    plan and method go into the safetensors metadata. `routers`, `router_rule`, `align`: how a merge
    writes router rows and whether it aligns neurons (moescope.compress.merge)."""
    check_method(plan, method)
    if packed_switches(read_config(check_checkpoint_dir(source))):
        raise MoescopeError(f"{source} holds its experts packed at per-expert widths (quantize --per-expert), in "
                            "groups that pruning does not rewrite: prune the Hugging Face checkpoint it was made from, "
                            "then quantise again")
    if method not in MLX_LAYOUT_METHODS and is_mlx_layout(source):
        raise MoescopeError(f"{source} is in mlx-lm's converted layout, which takes --method remove or mask "
                            f"(its tensors may be packed codes, which {method} would not edit as it says)")
    if method == "merge":
        return merge_checkpoint(source, out, plan, routers, router_rule, overwrite, align)
    edit, config_edit = checkpoint_edit(plan, method, shapes(check_checkpoint_dir(source)), offset)
    metadata = {"method": method, "offset": offset, "plan": plan.to_json()}
    return rewrite_checkpoint(source, out, edit, config_edit=config_edit, metadata=metadata,
                              description=f"prune ({method})", overwrite=overwrite)


@dataclass
class ReplayResult:
    """Selections per MoE layer during a replay of prompts through a (pruned) model."""

    tokens: int
    selections: dict[int, int]  # all selections (tokens x top-k)
    pruned_selections: dict[int, int]  # selections that went to pruned experts

    @property
    def pruned_total(self) -> int:
        return sum(self.pruned_selections.values())

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def replay(model, token_batches, watched: dict[int, list[int]]) -> ReplayResult:
    """Run (ids, mask) batches through `model` and count how often each layer chose a `watched` expert."""
    selections: dict[int, int] = {}
    hits: dict[int, int] = {}
    tokens = 0

    def on_event(event) -> None:
        selections[event.layer] = selections.get(event.layer, 0) + event.expert_ids.numel()
        experts = watched.get(event.layer)
        if experts:
            chosen = torch.isin(event.expert_ids, torch.tensor(experts, device=event.expert_ids.device))
            hits[event.layer] = hits.get(event.layer, 0) + int(chosen.sum())

    device = input_device(model)
    with routing_capture(model, on_event=on_event):
        for ids, mask in token_batches:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            tokens += int(mask.sum())
    return ReplayResult(tokens, selections, {layer: hits.get(layer, 0) for layer in watched})


def replay_batches(model_dir, calibration: str, prompts: int, max_tokens: int, batch_size: int = 8):
    encoded = encode(load_calibration(calibration)[:prompts], load_tokenizer(model_dir), max_tokens)
    return [padded([e.ids for e in encoded[i:i + batch_size]]) for i in range(0, len(encoded), batch_size)]
