"""Where an MoE's facts live: config key names, expert tensor layouts in memory, and tensor names on disk.

Config keys: each architecture names its expert count and top-k differently, and multimodal or
DBRX-style configs nest them (`text_config`, `ffn_config`).

In memory (transformers 5): experts are fused, `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`,
i.e. [E, out, in]; experts that set `is_transposed` (gpt-oss) and the classes in `TRANSPOSED` store
[E, in, out]; DBRX keeps [E * I, H] matrices, viewed as [E, I, H]. `expert_matrices` gives every
layout as per-expert views sharing the parameters' storage.

On disk the hub's own layout is kept: per-expert keys (`model.layers.3.mlp.experts.7.gate_proj.weight`),
fused keys with the experts first (`...experts.gate_up_proj`, mlx-lm's `...switch_mlp.gate_proj.weight` and
its quantised `.scales` / `.biases`; models.mlx_layout), and router tensors (a `gate`/`router`
tensor of the layer whose first dimension is the expert count: weight rows, a logit bias or a
correction bias).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moescope.errors import MoescopeError

if TYPE_CHECKING:
    import torch

    from moescope.models.base import MoELayer

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
HIDDEN_SIZE_KEYS = ("hidden_size", "d_model", "n_embd")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "moe_k", "top_k")
NESTED_SECTIONS = ("text_config", "ffn_config")  # where composite configs keep the language model's keys
# Experts classes without an `is_transposed` attribute whose (named) matrices are stored [in, out].
TRANSPOSED = {"Llama4TextExperts": {"gate_up_proj", "down_proj"}, "DbrxExperts": {"mlp.w2"}}

# Tensor names on disk.
LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")
EXPERT_KEY = re.compile(r"\.(?:experts|switch_mlp)\.(?:(\d+)\.)?")  # switch_mlp: mlx-lm's converted layout
ROUTER_KEY = re.compile(r"(?:^|\.)(?:gate|router)\b|e_score_correction_bias|expert_bias")
ROUTER_LOGIT_BIAS = re.compile(r"(?:gate|router)\.bias$")  # a bias added to the logits (not a choice-only correction)
SHARED_MARKERS = ("shared_expert", "shared_mlp")


# ---------------------------------------------------------------- configs


def text_config(config):
    """The config that describes the language model (multimodal configs nest it)."""
    return getattr(config, "text_config", None) or config


def config_value(config, keys: tuple[str, ...]) -> int | None:
    """First of `keys` set (as an int) on a config object or on its nested ffn_config (DBRX)."""
    for source in (config, getattr(config, "ffn_config", None)):
        for key in keys:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int):
                return value
    return None


def config_sections(config: dict) -> list[dict]:
    """A config.json dict and the nested sections that may hold the language model's keys."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return [s for s in (text, config, text.get("ffn_config")) if isinstance(s, dict)]


def dict_value(config: dict, keys: tuple[str, ...]) -> int | None:
    """First of `keys` set (as an int) in a config.json dict or its nested sections."""
    return next((s[k] for s in config_sections(config) for k in keys if isinstance(s.get(k), int)
                 and not isinstance(s.get(k), bool)), None)


def check_routing_config(config: dict, where: str) -> None:
    """Refuse an expert count or top-k that no model can route with (a damaged or hand-edited config.json)."""
    for section in config_sections(config):
        for key in (*EXPERT_COUNT_KEYS, *TOP_K_KEYS):
            value = section.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise MoescopeError(f"{where}: {key} is {value!r}, not an integer; restore the checkpoint's config")
    experts, top_k = dict_value(config, EXPERT_COUNT_KEYS), dict_value(config, TOP_K_KEYS)
    if (experts is not None and experts < 1) or (top_k is not None and top_k < 1) or (
            None not in (experts, top_k) and top_k > experts):
        raise MoescopeError(f"{where}: top-k {top_k} of {experts} experts cannot be routed; restore the checkpoint's "
                            "config")


def set_expert_count(config: dict, count: int) -> dict:
    """`config` (a config.json dict, its own key names kept) with every expert-count key set to `count`."""
    for section in config_sections(config):
        for key in EXPERT_COUNT_KEYS:
            if isinstance(section.get(key), int):
                section[key] = count
    return config


def context_length(config) -> int | None:
    """The model's context in tokens (None when the config states none)."""
    value = getattr(text_config(config), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def prompt_room(config, new_tokens: int, flag: str) -> int | None:
    """How many tokens a prompt may have so that it and `new_tokens` more fit the model's context
    (None when the config states no context); `flag` names the option that asked for the new tokens."""
    context = context_length(config)
    if context is None:
        return None
    if context - new_tokens < 1:
        raise MoescopeError(f"{flag} {new_tokens} leaves no room for a prompt in the model's context of "
                            f"{context} tokens")
    return context - new_tokens


# ---------------------------------------------------------------- experts in memory


@dataclass
class ExpertMatrix:
    """One fused expert matrix: `view[e]` is expert e's weight, stored [out, in] or [in, out]."""

    name: str
    view: torch.Tensor = field(repr=False)  # [E, out, in] or [E, in, out], sharing the parameter's storage
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of one expert's matrix."""
        a, b = self.view.shape[1:]
        return (b, a) if self.transposed else (a, b)

    def as_out_in(self, w: torch.Tensor) -> torch.Tensor:
        """Slices of `view` ([n, ...]) as [n, out, in] (a view, no copy)."""
        return w.transpose(1, 2) if self.transposed else w


def expert_matrices(layer: MoELayer) -> list[ExpertMatrix]:
    """The weight matrices of one MoE layer's experts (biases and vectors are left out)."""
    experts, count = layer.experts, layer.num_experts
    transposed_names = TRANSPOSED.get(type(layer.experts).__name__)
    matrices = []
    for name, param in experts.named_parameters():
        if name.endswith("bias") or param.dim() < 2:
            continue
        if param.dim() == 3 and param.shape[0] == count:
            view = param.data
        elif param.dim() == 2 and param.shape[0] % count == 0:
            view = param.data.view(count, -1, param.shape[1])
        else:
            raise MoescopeError(f"cannot read {layer.path}.experts.{name} of shape {tuple(param.shape)} as "
                                f"[{count}, out, in] for {count} experts")
        transposed = name in transposed_names if transposed_names else bool(getattr(experts, "is_transposed", False))
        matrices.append(ExpertMatrix(name, view, transposed))
    if not matrices:
        raise MoescopeError(f"{layer.path}.experts has no fused expert weights")
    return matrices


# ---------------------------------------------------------------- tensors on disk


@dataclass(frozen=True)
class KeyInfo:
    """What a tensor name says about its place in the MoE structure."""

    layer: int | None
    kind: str  # "expert" (one expert's tensor), "fused" (all experts stacked), "router", "other"
    expert: int | None = None


def classify_key(name: str, shape: tuple[int, ...], experts_per_layer: dict[int, int]) -> KeyInfo:
    """Where the tensor `name` of `shape` sits, for a model with `experts_per_layer` (MoE layers only)."""
    layer_match = LAYER_KEY.search(name)
    layer = int(layer_match.group(1)) if layer_match else None
    if layer not in experts_per_layer:
        return KeyInfo(layer, "other")
    expert_match = EXPERT_KEY.search(name)
    if expert_match:
        index = expert_match.group(1)
        return KeyInfo(layer, "expert", int(index)) if index is not None else KeyInfo(layer, "fused")
    tail = name[layer_match.end():]
    if ROUTER_KEY.search(tail) and "shared" not in tail and shape and shape[0] == experts_per_layer[layer]:
        return KeyInfo(layer, "router")
    return KeyInfo(layer, "other")


def per_expert_view(tensor: torch.Tensor, num_experts: int) -> torch.Tensor:
    """A fused tensor as [E, ...]: experts first, or DBRX's [E * I, H] split into [E, I, H]."""
    if tensor.shape[0] == num_experts:
        return tensor
    if tensor.shape[0] % num_experts:
        raise MoescopeError(f"cannot split a tensor of shape {tuple(tensor.shape)} into {num_experts} experts")
    return tensor.view(num_experts, tensor.shape[0] // num_experts, *tensor.shape[1:])


def per_expert_module_pattern(layer: int) -> str:
    """A regex for the module names of one layer's routed experts in the checkpoint's per-expert naming
    (`model.layers.3.mlp.experts.7.down_proj`, Mixtral's `block_sparse_moe.experts.7.w2`); shared experts
    (`shared_experts`, `shared_expert`) do not match."""
    return f".*layers\\.{layer}\\.[^.]+\\.experts\\.\\d+\\.[^.]+$"


def describe_tensors(headers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Expert structure read from tensor names and shapes alone: layers, experts per layer (by index on
    disk, or the fused tensor's first dimension), parameter and byte totals."""
    totals = {"params_total": 0, "bytes_total": 0, "params_in_experts": 0, "bytes_in_experts": 0}
    experts_seen: dict[int, set[int]] = {}
    fused: dict[int, int] = {}
    shared = False
    for name, info in headers.items():
        size = 1
        for dim in info["shape"]:
            size *= dim
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        totals["params_total"] += size
        totals["bytes_total"] += nbytes
        shared = shared or any(marker in name for marker in SHARED_MARKERS)
        match = EXPERT_KEY.search(name)
        if not match:
            continue
        totals["params_in_experts"] += size
        totals["bytes_in_experts"] += nbytes
        layer_match = LAYER_KEY.search(name)
        layer = int(layer_match.group(1)) if layer_match else 0
        if match.group(1) is not None:
            experts_seen.setdefault(layer, set()).add(int(match.group(1)))
        elif info["shape"]:
            fused[layer] = info["shape"][0]
    return {**totals, "shared_expert": shared,
            "experts_on_disk": {layer: len(seen) for layer, seen in experts_seen.items()}, "fused_experts": fused}
