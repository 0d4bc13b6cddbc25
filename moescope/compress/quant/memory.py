"""What a plan's model would take really packed: codes plus an fp16 scale (and offset) per group."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from moescope.compress.quant.apply import check_plan, non_expert_linears
from moescope.models.layout import expert_matrices
from moescope.plans import UNQUANTISED, BitPlan, QuantOptions


def matrix_bytes(out_features: int, in_features: int, bits: int, options: QuantOptions) -> int:
    """Bytes of one [out, in] matrix packed at `bits`: the codes plus an fp16 scale (and offset) per group."""
    if bits == UNQUANTISED:
        return out_features * in_features * 2
    groups = out_features * math.ceil(in_features / options.group_size)
    return math.ceil(out_features * in_features * bits / 8) + groups * (2 if options.symmetric else 4)


@dataclass
class MemoryEstimate:
    """Bytes the really packed model would take (everything not quantised counted as bf16)."""

    expert_bytes: int
    non_expert_bytes: int  # linear layers outside the routed experts, at non_expert_bits
    other_bytes: int  # embeddings, LM head, norms, routers, biases
    bf16_bytes: int  # the whole model in bf16
    expert_bits: float  # mean bits per expert weight (scales not counted)

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.non_expert_bytes + self.other_bytes

    def format(self) -> str:
        return (f"packed size {format_bytes(self.total_bytes)} vs {format_bytes(self.bf16_bytes)} in bf16 "
                f"({self.total_bytes / self.bf16_bytes:.1%}): experts {format_bytes(self.expert_bytes)} at "
                f"{self.expert_bits:.2f} average bits, other linear {format_bytes(self.non_expert_bytes)}, "
                f"rest {format_bytes(self.other_bytes)}")


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return ""


def memory_estimate(model: nn.Module, plan: BitPlan) -> MemoryEstimate:
    """The packed size of `model` under `plan` (only shapes are read: a meta-device model works)."""
    options = plan.options
    expert_bytes = expert_bits = expert_count = 0
    counted = set()
    for layer in check_plan(plan, model):
        counted.update(id(p) for p in layer.experts.parameters())
        for weight in expert_matrices(layer):
            out_f, in_f = weight.shape
            for b in plan.layers[layer.index]:
                expert_bytes += matrix_bytes(out_f, in_f, b, options)
                expert_bits += b * out_f * in_f
                expert_count += out_f * in_f
        expert_bytes += sum(p.numel() * 2 for n, p in layer.experts.named_parameters() if n.endswith("bias"))
    non_expert_bytes = 0
    for _, linear in non_expert_linears(model):
        counted.add(id(linear.weight))
        non_expert_bytes += matrix_bytes(*linear.weight.shape, options.non_expert_bits, options)
    params = list(model.parameters())
    other_bytes = sum(p.numel() * 2 for p in params if id(p) not in counted)
    return MemoryEstimate(expert_bytes, non_expert_bytes, other_bytes, sum(p.numel() * 2 for p in params),
                          expert_bits / expert_count)
