"""compressed-tensors: an llm-compressor recipe (YAML) that the named loader decodes as planned.

The two loaders read a checkpoint's MoE experts differently (docs/quantization.md names the
functions; both read in their sources, transformers checked by round trips):

- transformers 5.17-5.24 (compressed-tensors 0.19) rebuilds each layer's fused expert tensors while
  loading and decodes every one of them with one scheme for the whole model: `get_experts_scheme`,
  the first config group whose `re:` target mentions experts. So every expert of every layer needs
  one width, one strategy and group size, symmetric (expert zero points are dropped), and no MoE
  layer may be left unquantised. Other Linear layers are decoded module by module.
- vLLM 0.33 looks the scheme up per fused-MoE layer (`CompressedTensorsMoEMethod.get_moe_method`)
  and refuses a layer whose gate, up and down projections differ; a layer may stay unquantised.

Either way one strategy serves every matrix here: `group` when the group size divides every input,
`channel` (one scale per row, moescope's group of a whole row) when no input is longer than a
group. Anything else gets the largest group size of at least 32 that divides every input, or
channel. The plan becomes symmetric: compressed-tensors' zero point is an integer on a
zero-inclusive range, not moescope's asymmetric grid. PyYAML comes with transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from torch import nn

from moescope.compress.quant.apply import non_expert_linears
from moescope.compress.quant.kernels import SHRINK_FACTORS
from moescope.errors import MoescopeError
from moescope.models.layout import expert_matrices, per_expert_module_pattern
from moescope.models.registry import find_moe_layers
from moescope.plans import SUPPORTED_BITS, UNQUANTISED, BitPlan

NAME = "compressed-tensors"
TARGETS = ("transformers", "vllm")
LOADER_NOTE = "loader:"  # notes the CLI prints too
SMALLEST_GROUP = 32
MARLIN_GROUPS = (32, 64, 128)  # vLLM's Marlin MoE kernels: these groups or channel, 4 and 8 bits
IGNORED = ("lm_head", "re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$", "re:.*shared_expert_gate$")


def expert_regex(layer: int) -> str:
    """llm-compressor's regex target for one layer's routed expert modules."""
    return "re:" + per_expert_module_pattern(layer)


def fitting_group(group_size: int, inputs: set[int]) -> int:
    """The group size that keeps one strategy for every matrix with these input sizes: `group_size` when
    it divides them all or no input is longer (channel), else the largest divisor of every input of at
    least SMALLEST_GROUP below it, else the longest input (channel)."""
    if all(size % group_size == 0 for size in inputs) or group_size >= max(inputs):
        return group_size
    common = math.gcd(*inputs)
    return next((g for g in range(min(group_size, common), SMALLEST_GROUP - 1, -1) if common % g == 0), max(inputs))


def strategy(group_size: int, inputs: set[int]) -> str:
    return "group" if all(size % group_size == 0 for size in inputs) else "channel"


@dataclass(frozen=True)
class Loader:
    """compressed-tensors as one loader (`target`) reads it, for one model's matrix sizes."""

    target: str
    expert_inputs: frozenset[int]
    other_inputs: frozenset[int]  # the linear layers quantised at the plan's non_expert_bits
    hidden: int

    @property
    def whole_model(self) -> bool:
        """transformers decodes every expert of the model with one scheme: one width for them all."""
        return self.target == "transformers"

    @property
    def widths(self) -> tuple[int, ...]:
        """Expert widths the loader can load; transformers cannot leave an MoE layer unquantised."""
        return SUPPORTED_BITS if self.target == "transformers" else (*SUPPORTED_BITS, UNQUANTISED)

    def inputs(self, plan: BitPlan) -> set[int]:
        return set(self.expert_inputs) | (set(self.other_inputs) if plan.non_expert_bits != UNQUANTISED else set())

    def adjust(self, plan: BitPlan) -> tuple[BitPlan, list[str]]:
        """The plan as the loader can decode it exactly (symmetric, one strategy) and what changed."""
        notes = [self.loader_note()]
        if not plan.symmetric:
            notes.append("asymmetric -> symmetric: compressed-tensors' zero point is an integer on a range stretched "
                         "to include 0, not moescope's grid" + (", and transformers drops expert zero points"
                                                                if self.whole_model else ""))
            plan = replace(plan, symmetric=True, scales="minmax" if plan.scales == "mlx" else plan.scales)
        if plan.scales == "mse":
            notes.append("mse scales: llm-compressor's mse observer minimises |error|^2.4 on a finer grid of ranges "
                         "than moescope's squared-error search, so its ranges can differ slightly")
        inputs = self.inputs(plan)
        group = fitting_group(plan.group_size, inputs)
        if group != plan.group_size:
            notes.append(f"group size {plan.group_size} -> {group}: one strategy must fit every quantised matrix's "
                         f"inputs ({', '.join(map(str, sorted(inputs)))}), and {plan.group_size} neither divides "
                         "them all nor covers the longest")
            plan = replace(plan, group_size=group)
        if strategy(group, inputs) == "channel":
            notes.append(f"strategy channel: one scale per row, what moescope's group of {group} is on inputs of "
                         f"{', '.join(map(str, sorted(inputs)))}")
        return plan, notes + (self.vllm_notes(plan) if self.target == "vllm" else [])

    def loader_note(self) -> str:
        if self.whole_model:
            return (f"{LOADER_NOTE} transformers (5.17-5.24, compressed-tensors 0.19) decodes every expert of the "
                    "model with one scheme (get_experts_scheme): one width, group size and strategy for all of "
                    "them, symmetric, no MoE layer left unquantised")
        return (f"{LOADER_NOTE} vLLM (0.33) takes a scheme per MoE layer, the same for its gate, up and down "
                "projections (CompressedTensorsMoEMethod.get_moe_method); a layer at 16 bits stays unquantised")

    def vllm_notes(self, plan: BitPlan) -> list[str]:
        """Which of vLLM's MoE kernels can run the layers (a GPU is needed for every one of them)."""
        notes = []
        low = sorted(i for i, bits in plan.layers.items() if bits[0] in (2, 3))
        if low:
            notes.append(f"{LOADER_NOTE} layers {', '.join(map(str, low))} at 2 or 3 bits run only on vLLM's Humming "
                         "kernels (CUDA, compute capability 7.5 or later); releases before 0.33 load 4 and 8 bits only")
        channel = strategy(plan.group_size, self.inputs(plan)) == "channel"
        if (not channel and plan.group_size not in MARLIN_GROUPS) or self.hidden % 128:
            notes.append(f"{LOADER_NOTE} no Marlin kernel for this model (it needs groups of 32, 64 or 128 or "
                         f"channel, and a hidden size that is a multiple of 128; here {self.hidden})")
        if not channel:
            notes.append(f"with tensor parallelism TP the group size {plan.group_size} must also divide each "
                         "expert's intermediate size / TP, or vLLM refuses to load")
        return notes

    def model_notes(self, plan: BitPlan, model: nn.Module) -> list[str]:
        return []

    def write(self, plan: BitPlan, notes: list[str], out: Path, model_dir=None) -> str:
        """The recipe: one config group per expert width over whole layers (never split by projection), one
        for the other Linear layers, MoE layers at 16 bits ignored."""
        kind = strategy(plan.group_size, self.inputs(plan))
        widths: dict[int, list[str]] = {}
        for index, bits in sorted(plan.layers.items()):
            widths.setdefault(bits[0], []).append(expert_regex(index))
        groups = {f"experts_{bits}bit": {"targets": regexes, "weights": scheme(plan, bits, kind)}
                  for bits, regexes in sorted(widths.items()) if bits != UNQUANTISED}
        if plan.non_expert_bits != UNQUANTISED:
            groups[f"other_{plan.non_expert_bits}bit"] = {"targets": ["Linear"],
                                                          "weights": scheme(plan, plan.non_expert_bits, kind)}
        modifier = {"ignore": [*IGNORED, *widths.get(UNQUANTISED, [])], "config_groups": groups}
        recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": modifier}}}
        return "".join(f"# {line}\n" for line in notes) + yaml.safe_dump(recipe, sort_keys=False)


def scheme(plan: BitPlan, bits: int, kind: str) -> dict:
    """One config group's weight arguments."""
    args = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": kind}
    if kind == "group":
        args["group_size"] = plan.group_size
    if plan.scales == "mse":  # llm-compressor's MSE observer, searching as far down as moescope does
        args |= {"observer": "mse", "observer_kwargs": {"maxshrink": round(1 - min(SHRINK_FACTORS), 2)}}
    return args


def for_target(target: str | None, model: nn.Module | None) -> Loader:
    """The format as `target` loads it, fitted to `model`'s matrix sizes (a meta-device model works)."""
    if target not in TARGETS:
        raise MoescopeError(f"--format {NAME} needs --target transformers or vllm: they decode different "
                            "recipes (docs/quantization.md)")
    if model is None:
        raise MoescopeError(f"--format {NAME} needs --model MODEL_DIR: the group size must fit every expert's "
                            "input size, read from the checkpoint's config")
    expert_inputs = frozenset(m.shape[1] for layer in find_moe_layers(model) for m in expert_matrices(layer))
    other_inputs = frozenset(linear.in_features for _, linear in non_expert_linears(model))
    return Loader(target, expert_inputs, other_inputs, model.get_input_embeddings().embedding_dim)
