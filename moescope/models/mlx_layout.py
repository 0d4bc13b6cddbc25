"""mlx-lm's view of a checkpoint: the config keys it reads, and how its converted layout differs.

mlx-lm reads the hub's config key names. transformers 5 re-serialises configs under new names
(`rope_theta`, `rope_scaling` and `partial_rotary_factor` move into `rope_parameters`; the Qwen MoE
families' `num_experts` becomes `num_local_experts`), so a checkpoint saved by transformers 5 misses
keys mlx-lm needs (qwen2_moe silently falls back to another rope_theta). `with_hub_keys` adds the
hub names back beside the new ones; it never replaces a key, and transformers reads the result as
the same config (its identity hash does not change).

mlx-lm's converted layout (`mlx_lm.convert`, moescope's `quantize --backend mlx`) stacks each
layer's experts under `switch_mlp` (or `experts` for gpt-oss and Llama-4), experts first, quantised
as a packed uint32 `weight` plus `scales` and `biases`; its config gains `quantization` (and the same
dict again as `quantization_config`), one entry per module quantised differently from the default.

moescope's per-expert widths (`quantize --backend mlx --per-expert`, backends.mlx.packed) keep that
layout with one switch per width under each layer's switch path (`...switch_mlp.groups.1.down_proj.scales`)
and list every switch's per-expert widths in config.json under `PACKED_KEY`:
`{"format_version": 1, "switches": {"model.layers.1.mlp.switch_mlp": [4, 2, 8, ...]}}`.
"""

from __future__ import annotations

import copy

from moescope.errors import MoescopeError
from moescope.plans import SUPPORTED_BITS, UNQUANTISED

# Families whose hub configs name the expert count `num_experts` where transformers 5 writes `num_local_experts`.
HUB_EXPERT_COUNT_KEY = {model_type: "num_experts" for model_type in
                        ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text")}
SWITCH_NAMES = ("switch_mlp", "experts")  # the child of an mlx-lm MoE block that holds its experts (SwitchGLU)
CONVERTED_MARKERS = (".switch_mlp.",)  # tensor names only mlx-lm's converted layout has
MLX_FORMAT = "mlx"  # the safetensors metadata "format" mlx-lm writes
PACKED_KEY = "moescope_packed_experts"  # config.json: the per-expert widths of a packed model
PACKED_FORMAT_VERSION = 1
PACKED_BITS = (*SUPPORTED_BITS, UNQUANTISED)  # the widths a packed group holds (16: unquantised)


def _hub_section(section: dict) -> dict:
    """One config section with the hub's key names added where transformers 5 moved them."""
    rope = section.get("rope_parameters") if isinstance(section.get("rope_parameters"), dict) else {}
    added = dict(section)
    if "rope_theta" not in added and "rope_theta" in rope:
        added["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" not in added and "partial_rotary_factor" in rope:
        added["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "rope_scaling" not in added and rope:
        kind = rope.get("rope_type", "default")
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        added["rope_scaling"] = None if kind == "default" else {**scaling, "type": kind}
    count_key = HUB_EXPERT_COUNT_KEY.get(str(added.get("model_type")))
    if count_key and count_key not in added and isinstance(added.get("num_local_experts"), int):
        added[count_key] = added["num_local_experts"]
    return added


def with_hub_keys(config: dict) -> dict:
    """A copy of `config` (a config.json dict) with the hub's key names added beside transformers 5's,
    in the top level and in a nested `text_config`."""
    config = _hub_section(copy.deepcopy(config))
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = _hub_section(config["text_config"])
    return config


def without_mlx_keys(config: dict) -> dict:
    """`config` without what mlx-lm's conversion added: `quantization`, and `quantization_config` when it is
    mlx-lm's copy of it (a hub checkpoint's own quantization_config, with a quant_method, is kept), and
    without moescope's per-expert widths (`PACKED_KEY`)."""
    kept = dict(config)
    kept.pop(PACKED_KEY, None)
    quantization = kept.pop("quantization", None)
    mlx_copy = kept.get("quantization_config")
    if isinstance(mlx_copy, dict) and (mlx_copy == quantization or "quant_method" not in mlx_copy):
        kept.pop("quantization_config")
    return kept


def is_converted(config: dict, tensor_names, metadata: dict | None) -> bool:
    """Whether a checkpoint is in mlx-lm's converted layout (which transformers cannot load)."""
    if isinstance(config.get("quantization"), dict) or PACKED_KEY in config:
        return True
    if (metadata or {}).get("format") == MLX_FORMAT:
        return True
    return any(marker in name for name in tensor_names for marker in CONVERTED_MARKERS)


def packed_switches(config: dict, where: str = "config.json") -> dict[str, list[int]]:
    """The per-expert widths of a packed model's switches (module path -> bits of each expert), {} for a model
    without them; MoescopeError for an entry that is not what `quantize --per-expert` writes."""
    entry = config.get(PACKED_KEY)
    if entry is None:
        return {}
    if not isinstance(entry, dict) or entry.get("format_version") != PACKED_FORMAT_VERSION:
        raise MoescopeError(f"{where}: {PACKED_KEY} is not format_version {PACKED_FORMAT_VERSION} of moescope's "
                            "per-expert widths; write the model again with `moescope quantize --per-expert`")
    switches = entry.get("switches")
    if not isinstance(switches, dict) or not switches:
        raise MoescopeError(f"{where}: {PACKED_KEY} lists no switches")
    for path, bits in switches.items():
        if not isinstance(bits, list) or not bits or any(b not in PACKED_BITS or isinstance(b, bool) for b in bits):
            raise MoescopeError(f"{where}: {PACKED_KEY} gives {path} the widths {bits!r}; a packed group holds "
                                f"{', '.join(map(str, PACKED_BITS[:-1]))} or 16 (unquantised) bits")
    return {path: list(bits) for path, bits in switches.items()}


def packed_entry(switches: dict[str, list[int]]) -> dict:
    """The config.json entry that `packed_switches` reads."""
    return {"format_version": PACKED_FORMAT_VERSION, "switches": switches}
