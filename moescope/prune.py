"""Expert pruning that really prunes: plans, five methods, run-time masks and replay verification.

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
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moescope.errors import MoescopeError
from moescope.output import read_json, write_atomic

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "assets" / "calibration.jsonl"

METHODS = ("mask", "remove", "zero", "soft", "row-1e9")
CHECKPOINT_MASK_BIAS = -1e4  # far below any logit or score, and representable in bf16 and fp16
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class PrunePlan:
    """Experts to prune per MoE layer, and where that choice came from."""

    model: dict  # {"model_type": ..., "config_hash": ...}
    num_experts: dict[int, int]  # MoE layer index -> experts in the source model
    top_k: int
    prune: dict[int, list[int]]  # MoE layer index -> experts to prune
    criterion: str = "manual"
    source: dict = field(default_factory=dict)  # profile path and hash, budget, protected domains

    def to_json(self) -> dict:
        layers = [{"layer": layer, "num_experts": self.num_experts[layer], "prune": sorted(self.prune.get(layer, []))}
                  for layer in sorted(self.num_experts)]
        return {"format_version": 1, "kind": "prune_plan", "model": self.model, "top_k": self.top_k,
                "criterion": self.criterion, "source": self.source, "layers": layers}

    @classmethod
    def from_json(cls, data: dict, where: str = "plan") -> PrunePlan:
        if data.get("kind") != "prune_plan" or data.get("format_version") != 1:
            raise MoescopeError(f"{where} is not a moescope prune plan (format_version 1)")
        try:
            return cls(model=data["model"], top_k=int(data["top_k"]), criterion=data.get("criterion", "manual"),
                       source=data.get("source", {}),
                       num_experts={int(e["layer"]): int(e["num_experts"]) for e in data["layers"]},
                       prune={int(e["layer"]): [int(x) for x in e["prune"]] for e in data["layers"]})
        except (KeyError, TypeError, ValueError) as error:
            raise MoescopeError(f"{where} is malformed ({error!r}); regenerate it with `moescope plan prune`") from None

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        return cls.from_json(read_json(path, "prune plan"), where=str(path))

    def kept(self, layer: int) -> list[int]:
        pruned = set(self.prune.get(layer, []))
        return [e for e in range(self.num_experts[layer]) if e not in pruned]

    def check(self, model_type: str, layers) -> None:
        """Refuse a plan made for another model, or one that leaves a layer fewer than top-k experts."""
        if self.model.get("model_type") != model_type:
            raise MoescopeError(f"the plan is for {self.model.get('model_type')}, not {model_type}: make a plan "
                                "from a profile of this model")
        actual = {layer.index: layer.num_experts for layer in layers}
        if actual != self.num_experts:
            raise MoescopeError(f"the plan is for another model: its MoE layers and expert counts {self.num_experts} "
                                f"differ from this model's {actual}")
        for layer, pruned in self.prune.items():
            if any(not 0 <= e < self.num_experts[layer] for e in pruned):
                raise MoescopeError(f"the plan prunes an expert outside 0..{self.num_experts[layer] - 1} "
                                    f"in layer {layer}")
            if len(self.kept(layer)) < self.top_k:
                raise MoescopeError(f"the plan leaves layer {layer} with {len(self.kept(layer))} experts, fewer than "
                                    f"top-k = {self.top_k}: prune fewer experts")


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
    from moescope.models import find_moe_layers, text_config

    config = text_config(model.config)
    handles = []
    try:
        for layer in find_moe_layers(model):
            if layer.index in offsets:
                def hook(module, args, output, layer=layer, offset=offsets[layer.index]):
                    if offset.dim() == 2:
                        tokens = layer.family.router_logits(output).shape[0]
                        offset = offset.repeat_interleave(tokens // offset.shape[0], dim=0)
                    return layer.family.reroute(output, layer, config, offset)

                handles.append(layer.router.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- writing a pruned checkpoint ----------------------------------------------------------------

def _set_expert_count(config: dict, count: int) -> dict:
    for section in (config, config.get("text_config"), config.get("ffn_config")):
        if isinstance(section, dict):
            for key in EXPERT_COUNT_KEYS:
                if isinstance(section.get(key), int):
                    section[key] = count
    return config


def checkpoint_edit(plan: PrunePlan, method: str, tensor_shapes: dict[str, tuple], offset: float = 0.0):
    """(edit, config_edit) that write `method` into a checkpoint; MoescopeError where it cannot be."""
    from moescope.checkpoint import classify, per_expert_view

    info = {name: classify(name, shape, plan.num_experts) for name, shape in tensor_shapes.items()}
    router_biases = {i.layer: name for name, i in info.items() if i.kind == "router" and len(tensor_shapes[name]) == 1}
    if method in ("mask", "soft"):
        usable = router_biases if method == "mask" else {
            layer: name for layer, name in router_biases.items() if re.search(r"(gate|router)\.bias$", name)}
        missing = sorted(set(plan.prune) - set(usable))
        if missing:
            what = "router bias" if method == "mask" else "router logit bias"
            raise MoescopeError(
                f"`{method}` cannot be written into this checkpoint: the router of layer {missing[0]} has no "
                f"{what}. Use --method remove (a structural mask), or evaluate it at run time with "
                f"moescope.prune.routing_offsets(model, offsets_for(plan))")
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
            return _set_expert_count(config, len(plan.kept(next(iter(plan.num_experts)))))
        return config

    return edit, config_edit


def prune_checkpoint(source: str | Path, out: str | Path, plan: PrunePlan, method: str, offset: float = 0.0) -> Path:
    """Write a pruned copy of `source` to `out`; the plan and method go into the safetensors metadata."""
    from moescope.checkpoint import rewrite_checkpoint, shapes
    from moescope.loading import check_checkpoint_dir

    if method not in METHODS:
        raise MoescopeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    edit, config_edit = checkpoint_edit(plan, method, shapes(check_checkpoint_dir(source)), offset)
    metadata = {"method": method, "offset": offset, "plan": plan.to_json()}
    return rewrite_checkpoint(source, out, edit, config_edit=config_edit, metadata=metadata,
                              description=f"prune ({method})")


# ---- ablation: measured importance -----------------------------------------------------------------

@torch.no_grad()
def ablation_scores(model, windows: torch.Tensor, max_rows: int = 64, progress: bool = True) -> dict[int, list[float]]:
    """Loss increase on `windows` when each expert alone is masked, per MoE layer.

    Batched: one forward pass masks a different expert in each copy of the windows, so a layer of
    E experts costs E x len(windows) window evaluations in E * len(windows) / max_rows passes.
    """
    from tqdm import tqdm

    from moescope.evaluate import window_nll
    from moescope.models import find_moe_layers

    def window_losses(rows: torch.Tensor) -> torch.Tensor:
        return window_nll(model, rows, batch_size=len(rows)) / (rows.shape[1] - 1)

    layers = find_moe_layers(model)
    base = window_losses(windows).mean().item()
    per_pass = max(1, max_rows // len(windows))
    scores: dict[int, list[float]] = {}
    total = sum((layer.num_experts + per_pass - 1) // per_pass for layer in layers)
    with tqdm(total=total, desc="ablation", unit="pass", disable=not progress) as bar:
        for layer in layers:
            scores[layer.index] = []
            for start in range(0, layer.num_experts, per_pass):
                experts = list(range(start, min(start + per_pass, layer.num_experts)))
                offsets = torch.zeros(len(experts) * len(windows), layer.num_experts)
                for i, expert in enumerate(experts):
                    offsets[i * len(windows):(i + 1) * len(windows), expert] = float("-inf")
                with routing_offsets(model, {layer.index: offsets}):
                    losses = window_losses(windows.repeat(len(experts), 1))
                scores[layer.index] += (losses.view(len(experts), -1).mean(-1) - base).tolist()
                bar.update()
    return scores


# ---- replay ----------------------------------------------------------------------------------------

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
    from moescope.capture import capture_routing

    selections: dict[int, int] = {}
    hits: dict[int, int] = {}
    tokens = 0

    def on_event(event) -> None:
        selections[event.layer] = selections.get(event.layer, 0) + event.expert_ids.numel()
        experts = watched.get(event.layer)
        if experts:
            chosen = torch.isin(event.expert_ids, torch.tensor(experts, device=event.expert_ids.device))
            hits[event.layer] = hits.get(event.layer, 0) + int(chosen.sum())

    with capture_routing(model, on_event=on_event):
        for ids, mask in token_batches:
            model(input_ids=ids, attention_mask=mask)
            tokens += int(mask.sum())
    return ReplayResult(tokens, selections, {layer: hits.get(layer, 0) for layer in watched})


# ---- CLI -------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint to prune (never modified)")
    parser.add_argument("--plan", required=True, help="prune plan from `moescope plan prune`")
    parser.add_argument("--method", choices=METHODS, default="remove",
                        help="remove (structural), mask (router bias), zero, soft, or row-1e9 (the seeds' flawed "
                             "method, for comparison)")
    parser.add_argument("--offset", type=float, default=2.0, help="logit offset for --method soft")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--calibration", default=str(DEFAULT_CALIBRATION),
                        help="prompts for the replay check (default: the embedded calibration set)")
    parser.add_argument("--replay-prompts", type=int, default=32, help="prompts replayed (0: skip the replay)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per replayed prompt")


def replay_batches(model_dir, calibration: str, prompts: int, max_tokens: int, batch_size: int = 8):
    from moescope.calibration import encode, load_calibration, padded
    from moescope.loading import load_tokenizer

    encoded = encode(load_calibration(calibration)[:prompts], load_tokenizer(model_dir), max_tokens)
    return [padded([e.ids for e in encoded[i:i + batch_size]]) for i in range(0, len(encoded), batch_size)]


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from moescope.loading import load_model
    from moescope.models import find_moe_layers, text_config

    plan = PrunePlan.load(args.plan)
    model = load_model(args.model_dir)
    plan.check(text_config(model.config).model_type, find_moe_layers(model))
    out = prune_checkpoint(args.model_dir, args.out, plan, args.method, args.offset)
    console = Console()
    console.print(f"wrote {out} ({args.method}, {sum(len(v) for v in plan.prune.values())} experts)")
    if args.replay_prompts <= 0:
        return 0
    if not Path(args.calibration).is_file():
        raise MoescopeError(f"replay set {args.calibration} not found: pass --calibration FILE or --replay-prompts 0")
    batches = replay_batches(args.model_dir, args.calibration, args.replay_prompts, args.max_tokens)
    before = replay(model, batches, plan.prune)
    pruned_model = load_model(out)
    after = replay(pruned_model, batches, {} if args.method == "remove" else plan.prune)
    table = Table(title=f"replay of {args.replay_prompts} prompts: selections of pruned experts")
    for column in ("layer", "pruned experts", "before", "after"):
        table.add_column(column, justify="right")
    for layer, experts in sorted(plan.prune.items()):
        total = after.selections.get(layer, 0) or 1
        hits = after.pruned_selections.get(layer, 0)
        table.add_row(str(layer), str(len(experts)), f"{before.pruned_selections[layer] / total:.2%}",
                      "removed" if args.method == "remove" else f"{hits} ({hits / total:.2%})")
    console.print(table)
    if args.method in ("mask", "remove") and after.pruned_total:
        raise MoescopeError(f"replay found {after.pruned_total} selections of masked experts: please report this")
    return 0
