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

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moescope.backends.hf.loading import input_device, load_tokenizer
from moescope.backends.select import is_mlx_layout, is_mlx_model, routing_capture
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

    @property
    def pruned_share(self) -> float:
        return self.pruned_total / max(1, sum(self.selections.values()))

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


def kept_ids(plan: PrunePlan) -> dict[int, torch.Tensor]:
    """layer -> the original id of each expert a `remove` checkpoint of `plan` keeps (its new id is the position)."""
    return {layer: torch.tensor(plan.kept(layer)) for layer in plan.num_experts}


def routes_changed(base_ids: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """bool [tokens]: the set of chosen experts differs (ids [tokens, k], in the same numbering)."""
    return (base_ids.sort(-1).values != cand_ids.to(base_ids.device).sort(-1).values).any(-1)


def count_route_changes(base_events, cand_events, id_map: dict[int, torch.Tensor], changed: dict[int, int],
                        seen: dict[int, int], baseline_map: dict[int, torch.Tensor] | None = None) -> None:
    """Add, per MoE layer, the tokens whose set of chosen experts differs between two captures of the same
    input to `changed`, and all tokens to `seen`. Candidate ids are mapped through `id_map` (a removal's new
    ids to the original ones) and baseline ids through `baseline_map` (a merge's original ids to the merged
    ones) where they have the layer."""
    baseline_map = baseline_map or {}
    for b, c in zip(base_events, cand_events, strict=True):
        cand_ids = id_map[c.layer].to(c.expert_ids.device)[c.expert_ids] if c.layer in id_map else c.expert_ids
        base_ids = baseline_map[b.layer].to(b.expert_ids.device)[b.expert_ids] if b.layer in baseline_map \
            else b.expert_ids
        moved = routes_changed(base_ids, cand_ids)
        changed[b.layer] = changed.get(b.layer, 0) + int(moved.sum())
        seen[b.layer] = seen.get(b.layer, 0) + moved.numel()


@torch.no_grad()
def router_difference(model, pruned, token_batches, plan: PrunePlan) -> dict[int, float]:
    """Per MoE layer, the share of tokens for which the `pruned` model's router (ids mapped back through the
    plan) chooses other experts than the original router with the plan's experts masked (-inf), both in
    float32 on the same inputs: the hidden states the original model gives that layer. Shared inputs keep a
    near tie flipped in one layer from moving every later one, and float32 keeps bf16 rounding of the
    sliced router from flipping ties (in bf16, 0.5-1.7 % of the demo model's tokens flip)."""
    config, pruned_config = text_config(model.config), text_config(pruned.config)
    id_map, offsets = kept_ids(plan), offsets_for(plan)
    pruned_layers = {layer.index: layer for layer in find_moe_layers(pruned)}
    changed: dict[int, int] = {}
    seen: dict[int, int] = {}

    def compare(layer, pruned_layer):
        original_router = copy.deepcopy(layer.router).float()
        pruned_router = copy.deepcopy(pruned_layer.router).float()

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.reshape(-1, hidden.shape[-1]).float()
            logits = layer.family.router_logits(original_router(hidden))
            if layer.index in offsets:
                logits = logits + offsets[layer.index].to(logits.device)
            ids = layer.family.route(logits, layer, config)[0]
            cand = pruned_layer.family.route(pruned_layer.family.router_logits(pruned_router(hidden)), pruned_layer,
                                             pruned_config)[0]
            moved = routes_changed(ids, id_map[layer.index].to(cand.device)[cand])
            changed[layer.index] = changed.get(layer.index, 0) + int(moved.sum())
            seen[layer.index] = seen.get(layer.index, 0) + moved.numel()

        return hook

    handles = []
    try:
        for layer in find_moe_layers(model):
            hook = compare(layer, pruned_layers[layer.index])
            handles.append(layer.router.register_forward_pre_hook(hook, with_kwargs=True))
        for ids, mask in token_batches:
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: changed[layer] / seen[layer] for layer in sorted(changed)}


# Removal equals a -inf mask up to float32 rounding of the sliced router, which can flip an exact near tie.
# A router row sliced for another expert moves far more tokens than this.
REMOVE_TOLERANCE = 0.001


@dataclass
class PruneCheck:
    """What a replay of calibration prompts shows about a pruned model (`check_pruned`)."""

    method: str
    before: ReplayResult  # the original model: selections of the experts the plan prunes
    after: ReplayResult  # the pruned model: selections of those experts (none watched after `remove`)
    remove_vs_mask: dict[int, float] | None  # remove: per layer, share of tokens the pruned router sends
    #                                          elsewhere than the original one under a -inf mask
    exact: bool  # remove: the router family says removal must equal that mask

    def failure(self) -> str | None:
        """Why the pruned model is not what its method promises, or None."""
        if self.method == "mask" and self.after.pruned_total:
            return f"replay found {self.after.pruned_total} selections of masked experts"
        if self.method == "remove" and self.exact:
            layer, share = max(self.remove_vs_mask.items(), key=lambda item: item[1])
            if share > REMOVE_TOLERANCE:
                return (f"after removal, the router of layer {layer} sends {share:.2%} of tokens to other experts "
                        "than the original router with the same experts masked")
        return None


def check_pruned(model, pruned, token_batches, plan: PrunePlan, method: str, refitted: bool = False) -> PruneCheck:
    """Replay `token_batches` through the original `model` and its `pruned` copy. For `remove`, where a
    removed expert cannot be chosen by construction, compare the pruned routers' choices (ids mapped back)
    with the original routers' under a -inf mask of the same experts (`router_difference`): for routers
    whose family says so they must agree token for token, which catches router rows sliced wrongly. Under
    mlx-lm that comparison is not made (`remove_vs_mask` None); after router repair (`refitted`) the routers
    are meant to differ, so it is made but not required."""
    before = replay(model, token_batches, plan.prune)
    after = replay(pruned, token_batches, {} if method == "remove" else plan.prune)
    differences, exact = None, False
    if method == "remove" and not is_mlx_model(model):
        differences = router_difference(model, pruned, token_batches, plan)
        config = text_config(model.config)
        exact = not refitted and all(layer.family.removal_equals_mask(layer, config)
                                     for layer in find_moe_layers(model))
    return PruneCheck(method, before, after, differences, exact)


def replay_batches(model_dir, calibration: str, prompts: int, max_tokens: int, batch_size: int = 8):
    encoded = encode(load_calibration(calibration)[:prompts], load_tokenizer(model_dir), max_tokens)
    return [padded([e.ids for e in encoded[i:i + batch_size]]) for i in range(0, len(encoded), batch_size)]
