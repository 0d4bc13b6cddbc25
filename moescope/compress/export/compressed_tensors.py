"""compressed-tensors: an llm-compressor recipe (YAML) with one `QuantizationModifier` config group per
width (and strategy), targeting each layer's expert Linear modules by regex (PyYAML comes with
transformers)."""

from __future__ import annotations

from pathlib import Path

import yaml

from moescope.checkpoints import shapes
from moescope.compress.quant.kernels import SHRINK_FACTORS
from moescope.errors import MoescopeError
from moescope.models.layout import per_expert_inputs, per_expert_module_pattern
from moescope.plans import UNQUANTISED, BitPlan

NAME = "compressed-tensors"


def expert_regex(layer: int, name: str = "[^.]+") -> str:
    """llm-compressor's regex target for one layer's routed expert modules (all, or those called `name`)."""
    return "re:" + per_expert_module_pattern(layer, name)


def adjust(plan: BitPlan) -> tuple[BitPlan, list[str]]:
    """What llm-compressor does differently from the plan, in plain words (the plan itself stays)."""
    notes = []
    if plan.scales == "mse":
        notes.append("mse scales: llm-compressor's mse observer minimises |error|^2.4 on a finer grid of ranges "
                     "than moescope's squared-error search, so its ranges can differ slightly")
    if not plan.symmetric:
        notes.append("asymmetric: compressed-tensors stretches each group's range to include 0 and rounds the zero "
                     "point to an integer, so its grid differs from moescope's (the group's own min and max, a "
                     "float offset); quantize --plan measures moescope's grid, not what llm-compressor writes")
    return plan, notes


def recipe(plan: BitPlan, notes: list[str], inputs: dict[tuple[int, str], int] | None = None) -> str:
    """An llm-compressor recipe (YAML): one config group per width (and strategy) over the layers at that width.

    llm-compressor needs the group size to divide a weight's input size. With `inputs` (`per_expert_inputs`),
    a module whose input is smaller than the group gets the "channel" strategy, one scale per output
    row, which is what moescope's quantiser does with such a row (one short group); one whose input is
    larger but not a multiple is refused. Without them every layer is one group-strategy target."""
    def scheme(bits: int, strategy: str = "group") -> dict:
        args = {"num_bits": bits, "type": "int", "symmetric": plan.symmetric, "strategy": strategy}
        if strategy == "group":
            args["group_size"] = plan.group_size
        if plan.scales == "mse":  # llm-compressor's MSE observer, searching as far down as moescope does
            args |= {"observer": "mse", "observer_kwargs": {"maxshrink": round(1 - min(SHRINK_FACTORS), 2)}}
        return args

    targets: dict[tuple[int, str], list[str]] = {}  # (bits, strategy) -> regexes
    unquantised = []
    for index, bits in sorted(plan.layers.items()):
        modules = sorted((name, size) for (layer, name), size in (inputs or {}).items() if layer == index)
        if bits[0] == UNQUANTISED:
            unquantised.append(expert_regex(index))
            continue
        if not modules:  # sizes unknown: the whole layer at the group strategy
            targets.setdefault((bits[0], "group"), []).append(expert_regex(index))
        for name, size in modules:
            if size > plan.group_size and size % plan.group_size:
                raise MoescopeError(f"layer {index} {name} has {size} inputs, not a multiple of the group size "
                                    f"{plan.group_size}, which llm-compressor requires: make the plan with a "
                                    "--group-size that divides it")
            strategy = "group" if size % plan.group_size == 0 else "channel"
            targets.setdefault((bits[0], strategy), []).append(expert_regex(index, name))
    groups = {f"experts_{bits}bit" + ("" if strategy == "group" else "_channel"):
              {"targets": regexes, "weights": scheme(bits, strategy)}
              for (bits, strategy), regexes in sorted(targets.items())}
    ignore = ["lm_head", "re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$", "re:.*shared_expert_gate$", *unquantised]
    if plan.non_expert_bits != UNQUANTISED:
        groups[f"other_{plan.non_expert_bits}bit"] = {"targets": ["Linear"], "weights": scheme(plan.non_expert_bits)}
    recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"ignore": ignore,
                                                                              "config_groups": groups}}}}
    header = "".join(f"# {line}\n" for line in notes)
    return header + yaml.safe_dump(recipe, sort_keys=False)


def model_notes(plan: BitPlan, model) -> list[str]:
    return []


def write(plan: BitPlan, notes: list[str], out: Path, model_dir=None) -> str:
    """The recipe's text, fitted to each expert module's input size when the checkpoint is given."""
    inputs = per_expert_inputs(shapes(Path(model_dir))) if model_dir is not None else {}
    if not inputs:
        notes.append("expert input sizes not checked (no --model, or its experts are stored fused): "
                     "llm-compressor needs the group size to divide every expert module's input")
    return recipe(plan, notes, inputs)
