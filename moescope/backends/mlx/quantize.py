"""Quantise a checkpoint for real with mlx-lm, module by module as a predicate says, and save its weights.

mlx-lm asks the predicate (`predicate(path, module)`, the one `moescope export --format mlx` writes)
about every module with a `to_quantized` whose inputs are a multiple of 32 (the default group size
passed here, so the predicate can give each module its own group size of 32, 64 or 128); a dict of
bits and group size quantises it, False leaves it as it is. With `expert_bits`, each MoE layer's
experts are first packed at their own widths (backends.mlx.packed) and the predicate decides the rest.
Weights are written by mlx-lm's `save_model` (mlx arrays straight to safetensors: bfloat16 kept bit for
bit, never through numpy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moescope.backends.mlx.loading import mlx_lm_model, require_mlx, switch_blocks
from moescope.checkpoints import read_config
from moescope.errors import MoescopeError
from moescope.models.mlx_layout import SWITCH_NAMES, with_hub_keys

PREDICATE_GROUP_SIZE = 32  # mlx-lm skips modules whose inputs are not a multiple of this before asking


def pack_experts(module, expert_bits: dict[int, list[int]], group_size: Callable[[int], int | None]) -> dict:
    """Replace every MoE layer's switch by a PackedSwitch with its experts at `expert_bits[layer]`; returns
    the per-expert widths by switch path (models.mlx_layout.packed_entry)."""
    from moescope.backends.mlx.packed import pack_switch  # imports mlx: after require_mlx

    switches = {}
    blocks = switch_blocks(module)
    if sorted(b.index for b in blocks) != sorted(expert_bits):
        raise MoescopeError(f"the plan has MoE layers {sorted(expert_bits)}, mlx-lm's model has experts in layers "
                            f"{[b.index for b in blocks]}")
    for block in blocks:
        name = next(n for n in SWITCH_NAMES if block.block.get(n) is block.switch)
        block.block[name] = pack_switch(block.switch, expert_bits[block.index], group_size, f"layer {block.index}")
        switches[f"{block.path}.{name}"] = list(expert_bits[block.index])
    return switches


def save_quantised(source: Path, out: Path, predicate: Callable, expert_bits: dict[int, list[int]] | None = None,
                   group_size: Callable[[int], int | None] | None = None) -> tuple[dict, dict]:
    """Quantise `source` as `predicate` says, its experts first packed at `expert_bits` (per layer, per expert;
    `group_size(inputs)` for each projection) when given, and save the weights into the directory `out`.
    Returns the `quantization` entry mlx-lm's loader reads from config.json (defaults plus one entry per
    module) and the per-expert widths by switch path ({} without `expert_bits`)."""
    require_mlx()
    from mlx_lm.utils import quantize_model, save_model

    config = read_config(source)
    module = mlx_lm_model(source, config, lazy=True)
    switches = pack_experts(module, expert_bits, group_size) if expert_bits is not None else {}
    module, quantised = quantize_model(module, with_hub_keys(config), PREDICATE_GROUP_SIZE, 4,
                                       quant_predicate=predicate)
    save_model(out, module)
    return quantised["quantization"], switches
