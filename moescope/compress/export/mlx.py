"""MLX: a Python file defining `quant_predicate(path, module, config)` for mlx-lm's converter, returning
`{"bits", "group_size"}` for each layer's routed experts (`switch_mlp`, or `experts`) and False for what
stays unquantised. `moescope quantize --backend mlx` runs the same predicate (compress.mlx_quantize)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from moescope.models.layout import expert_matrices
from moescope.models.registry import find_moe_layers
from moescope.plans import UNQUANTISED, BitPlan

NAME = "mlx"
MLX_GROUP_SIZES = (32, 64, 128)
FALLBACK_NOTE = "mlx fallback:"  # notes the CLI prints too

MLX_TEMPLATE = '''"""mlx-lm quantisation predicate from a moescope bit plan.

    from mlx_lm import convert
    from {module} import quant_predicate
    convert(HF_PATH, mlx_path=OUT, quantize=True, q_group_size=32, quant_predicate=quant_predicate)

q_group_size=32 whatever the plan's group size: mlx-lm skips every module whose inputs are not a
multiple of q_group_size before it asks the predicate, and the predicate gives each module its own.
"""

import re

{notes}
EXPERT_BITS = {layers}  # decoder layer -> bits of its routed experts (switch_mlp)
GROUP_SIZE = {group_size}
OTHER_BITS = {other}  # attention, shared experts, dense MLPs; None: unquantised
LAYER = re.compile(r"layers\\.(\\d+)\\.")


def group_size(inputs):
    """GROUP_SIZE; a module with fewer inputs has one group per row, as moescope quantises it; None if
    the inputs do not split into whole groups."""
    if inputs % GROUP_SIZE == 0:
        return GROUP_SIZE
    return inputs if inputs < GROUP_SIZE and inputs in (32, 64) else None


def quant_predicate(path, module, config=None):
    """False: leave unquantised; otherwise the bits and group size for this module. (mlx-lm calls it
    with (path, module, config) in older releases and (path, module) in newer ones.)"""
    if not hasattr(module, "to_quantized") or group_size(module.weight.shape[-1]) is None:
        return False  # norms, containers and layers whose inputs do not split into whole groups
    if path.endswith((".gate", ".router", "shared_expert_gate")) or "embed" in path or "lm_head" in path:
        return False  # routers, embeddings and the head stay as they are
    if ".switch_mlp." in path or ".experts." in path:  # routed experts (gpt-oss and Llama-4: `experts`)
        bits = EXPERT_BITS.get(int(LAYER.search(path).group(1)))
    else:
        bits = OTHER_BITS
    return False if bits is None else {{"bits": bits, "group_size": group_size(module.weight.shape[-1])}}
'''


def predicate(plan: BitPlan, notes: list[str], out: Path) -> str:
    def bits_or_none(bits: int) -> int | None:
        return None if bits == UNQUANTISED else bits

    layers = {index: bits_or_none(bits[0]) for index, bits in sorted(plan.layers.items())}
    module = out.stem if out.stem.isidentifier() else f"{out.stem.replace('-', '_')}  # after renaming the file"
    return MLX_TEMPLATE.format(module=module, notes="".join(f"# {line}\n" for line in notes), layers=layers,
                               group_size=plan.group_size, other=bits_or_none(plan.non_expert_bits))




def module_group_size(inputs: int, group_size: int) -> int | None:
    """The group size MLX packs a module of `inputs` inputs with (the predicate's `group_size`): the plan's
    where it divides them, one group per row where they are fewer than a group and that size is one MLX
    supports (as moescope's quantiser makes them), None where MLX cannot pack them."""
    if inputs % group_size == 0:
        return group_size
    return inputs if inputs < group_size and inputs in MLX_GROUP_SIZES else None


def model_notes(plan: BitPlan, model: nn.Module) -> list[str]:
    """One note per layer with expert matrices the predicate leaves unquantised: inputs that are
    neither a multiple of the group size nor one smaller group MLX supports (`module_group_size`)."""
    notes = []
    for layer in find_moe_layers(model):
        sizes = [(w.name, w.shape[1]) for w in expert_matrices(layer)]
        odd = [f"{name} ({size} inputs)" for name, size in sizes if plan.layers[layer.index][0] != UNQUANTISED
               and module_group_size(size, plan.group_size) is None]
        if odd:
            notes.append(f"{FALLBACK_NOTE} layer {layer.index}: {', '.join(odd)} do not split "
                         f"into groups of {plan.group_size}: mlx-lm leaves them unquantised")
    return notes


def adjust(plan: BitPlan) -> tuple[BitPlan, list[str]]:
    """The plan as MLX can store it (its group sizes, its affine rule), and what changed, in plain words."""
    notes = []
    if plan.group_size not in MLX_GROUP_SIZES:
        size = min(MLX_GROUP_SIZES, key=lambda g: abs(g - plan.group_size))
        notes.append(f"MLX supports group sizes {MLX_GROUP_SIZES}: the plan's {plan.group_size} is exported as {size}")
        plan = replace(plan, group_size=size)
    if plan.symmetric or plan.scales != "mlx":
        notes.append("MLX's affine quantisation keeps a scale and a bias per group, keeps each group's extreme of "
                     "larger magnitude exactly and puts zero on the grid: the plan as exported is asymmetric with "
                     f"scales \"mlx\" (was {'symmetric' if plan.symmetric else 'asymmetric'}, {plan.scales}), so "
                     "quantize --plan reproduces the weights mlx-lm serves")
        plan = replace(plan, symmetric=False, scales="mlx")
    return plan, notes


def write(plan: BitPlan, notes: list[str], out: Path, model_dir=None) -> str:
    return predicate(plan, notes, out)
