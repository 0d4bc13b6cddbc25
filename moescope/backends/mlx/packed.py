"""Per-expert bit widths that mlx runs: one MoE layer's experts in a few packed groups, one per width.

mlx-lm holds a layer's experts in one switch (`SwitchGLU` or `SwitchMLP`) whose projections are each
one stacked tensor at one width, so it cannot serve a plan that gives the experts of one layer
different widths. `PackedSwitch` can. It holds one switch of the original's own class per width
present in the layer, each over the experts planned at that width: 2, 3, 4 or 8 bits packed by
mlx-lm's own `to_quantized` (MLX's affine rule: a scale and an offset per group of inputs), or 16 for
unquantised. It is called like the switch it replaces, `(x [..., D], indices [..., k]) -> [..., k, D]`,
so mlx-lm's MoE blocks, moescope's capture and `MlxCausalLM` use it unchanged.

A call sorts the (token, expert) pairs by group and expert, reads how many pairs each group got (one
small host read per layer call: the slice bounds depend on the routing), runs each non-empty group's
switch once on its contiguous slice (one gathered quantised matmul per projection, `mx.gather_qmm`)
and puts the results back in the pairs' order: a handful of dispatches per layer, never one per
expert. A layer whose experts share one width is that width's switch alone, which is exactly mlx-lm's
own uniform quantisation.

On disk (`moescope quantize --backend mlx --per-expert`) each group's tensors sit under its switch's
path (`model.layers.3.mlp.switch_mlp.groups.1.down_proj.scales`), and config.json lists every switch's
per-expert widths (models.mlx_layout.PACKED_KEY). `model_classes` is the mlx-lm hook that splits each
listed switch into its groups when the model is built, before mlx-lm quantises the groups from the
saved scales and loads the weights, all checked:
`mlx_lm.utils.load_model(Path(DIR), get_model_classes=model_classes)`. Stock `mlx_lm.load` cannot open
such a model (it finds tensors it has no place for); `moescope.load(DIR)` can.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear, SwitchMLP

from moescope.errors import MoescopeError
from moescope.models.mlx_layout import PACKED_BITS, PACKED_KEY, packed_switches
from moescope.plans import UNQUANTISED

SWITCH_TYPES = (SwitchGLU, SwitchMLP)  # mlx-lm's experts switches, which PackedSwitch splits


def projections(switch: nn.Module) -> dict[str, nn.Module]:
    """The stacked expert projections of a switch (gate_proj, up_proj, down_proj; or fc1, fc2), by name."""
    return {name: child for name, child in switch.children().items()
            if isinstance(child, SwitchLinear | QuantizedSwitchLinear)}


def expert_count(switch: nn.Module) -> int:
    return next(iter(projections(switch).values())).num_experts


class PackedSwitch(nn.Module):
    """One layer's experts in groups of one width each (see the module docstring): `groups[g]`, a switch of
    the original's class, holds the experts `members[g]` (in that order) at `widths[g]` bits."""

    def __init__(self, groups: list[nn.Module], widths: list[int], members: list[list[int]]):
        super().__init__()
        self.groups = groups
        count = sum(map(len, members))
        group_of, local = [0] * count, [0] * count
        for g, experts in enumerate(members):
            for position, expert in enumerate(experts):
                group_of[expert], local[expert] = g, position
        # Underscored attributes are not parameters: they are neither saved nor loaded.
        self._widths = list(widths)
        self._members = [list(m) for m in members]
        self._group_of = mx.array(group_of, dtype=mx.uint32)
        self._local = mx.array(local, dtype=mx.uint32)

    @property
    def widths(self) -> list[int]:
        return list(self._widths)

    @property
    def num_experts(self) -> int:
        return sum(map(len, self._members))

    @property
    def bits(self) -> list[int]:
        """The width of each expert."""
        bits = [0] * self.num_experts
        for width, experts in zip(self._widths, self._members):
            for expert in experts:
                bits[expert] = width
        return bits

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        if len(self.groups) == 1:  # one width: the group holds every expert in order
            return self.groups[0](x, indices)
        if x.shape[:-1] != indices.shape[:-1]:
            raise MoescopeError(f"the packed experts take one input row per token: inputs {x.shape}, expert "
                                f"indices {indices.shape}")
        k = indices.shape[-1]
        flat = indices.reshape(-1)
        group = self._group_of[flat]
        order = mx.argsort(group * self.num_experts + flat)  # by group, then expert: each group contiguous
        counts = (group[None, :] == mx.arange(len(self.groups), dtype=mx.uint32)[:, None]).sum(axis=1).tolist()
        rows = x.reshape(-1, x.shape[-1])[order // k]
        local = self._local[flat[order]][:, None]
        outputs, start = [], 0
        for switch, count in zip(self.groups, counts):
            if count:
                outputs.append(switch(rows[start:start + count], local[start:start + count]))  # [count, 1, D]
                start += count
        return mx.concatenate(outputs)[mx.argsort(order)].reshape(*indices.shape, -1)


def experts_subset(switch: nn.Module, experts: list[int]) -> nn.Module:
    """A switch of `switch`'s own class (same activation) holding only `experts`, in that order; `switch` is
    left as it is. Every tensor of a projection has the experts first."""
    index = mx.array(experts, dtype=mx.uint32)
    subset = copy.copy(switch)
    for name, projection in projections(switch).items():
        sliced = copy.copy(projection)
        for key, value in projection.parameters().items():
            sliced[key] = value[index]
        subset[name] = sliced
    return subset


def split_switch(switch: nn.Module, bits: list[int]) -> PackedSwitch:
    """`switch` (unquantised) as a PackedSwitch whose groups are not yet packed (`pack_switch` packs them)."""
    if not isinstance(switch, SWITCH_TYPES):
        raise MoescopeError(f"per-expert widths split an unquantised SwitchGLU or SwitchMLP, not a "
                            f"{type(switch).__name__}")
    if any(isinstance(p, QuantizedSwitchLinear) for p in projections(switch).values()):
        raise MoescopeError("per-expert widths split an unquantised switch: this one is already quantised")
    if len(bits) != expert_count(switch):
        raise MoescopeError(f"{len(bits)} widths for a switch of {expert_count(switch)} experts")
    unsupported = sorted({b for b in bits if b not in PACKED_BITS})
    if unsupported:
        raise MoescopeError(f"per-expert widths of {unsupported} bits cannot be packed: a group holds "
                            f"{', '.join(map(str, PACKED_BITS[:-1]))} or 16 (unquantised) bits")
    widths = sorted(set(bits))
    members = [[e for e, b in enumerate(bits) if b == width] for width in widths]
    return PackedSwitch([experts_subset(switch, m) for m in members], widths, members)


def pack_switch(switch: nn.Module, bits: list[int], group_size: Callable[[int], int | None],
                where: str = "switch") -> PackedSwitch:
    """`switch` (unquantised) with expert e packed at `bits[e]`; `group_size(inputs)` is the group size for a
    projection with that many inputs, None where MLX cannot pack it (a MoescopeError naming `where`)."""
    packed = split_switch(switch, bits)
    sizes = {}
    for name, projection in projections(switch).items():
        sizes[name] = group_size(projection.input_dims)
        if sizes[name] is None and any(b != UNQUANTISED for b in bits):
            raise MoescopeError(f"{where}: the experts' {name} has {projection.input_dims} inputs, which the plan's "
                                "group size does not divide; MLX packs whole groups: make the plan with a group size "
                                "that divides it (32, 64 or 128)")
    for width, group in zip(packed.widths, packed.groups):
        if width != UNQUANTISED:
            for name, projection in projections(group).items():
                group[name] = projection.to_quantized(group_size=sizes[name], bits=width)
    return packed


def packed_bytes(module: nn.Module) -> int:
    """Bytes of every PackedSwitch's tensors in `module` (codes, scales and offsets, unquantised experts)."""
    return sum(value.nbytes for _, layer in module.named_modules() if isinstance(layer, PackedSwitch)
               for _, value in tree_flatten(layer.parameters()))


def split_switches(model: nn.Module, switches: dict[str, list[int]]) -> None:
    """Replace each switch `switches` names (module path -> per-expert widths) by its unpacked groups."""
    modules = dict(model.named_modules())
    for path, bits in switches.items():
        parent_path, _, name = path.rpartition(".")
        switch = modules[parent_path].get(name) if parent_path in modules else None
        if not isinstance(switch, SWITCH_TYPES) or len(bits) != expert_count(switch):
            found = (f"{expert_count(switch)} experts" if isinstance(switch, SWITCH_TYPES)
                     else "no experts switch there")
            raise MoescopeError(f"config.json's {PACKED_KEY} gives {path} {len(bits)} experts, the model has {found}: "
                                "it was written for another model")
        modules[parent_path][name] = split_switch(switch, bits)


def model_classes(config: dict) -> tuple[type, type]:
    """mlx-lm's `get_model_classes` hook for a model with per-expert widths: the family's own model and
    argument classes, the model's listed switches split into their groups as it is built."""
    from mlx_lm.utils import _get_classes  # mlx-lm's default hook (a pinned release of mlx-lm)

    model_class, args_class = _get_classes(config)
    switches = packed_switches(config)

    class PackedModel(model_class):
        def __init__(self, args):
            super().__init__(args)
            split_switches(self, switches)

    PackedModel.__name__ = PackedModel.__qualname__ = f"Packed{model_class.__name__}"
    return PackedModel, args_class
