"""Bit plans in the forms runtimes load: one module per format, found through `FORMATS`.

A bit plan gives every expert its own width, but llama.cpp, vLLM (compressed-tensors) and MLX all
store a layer's experts as one fused tensor with one quantisation type: none can serve two widths
inside it. So each layer is first coarsened to one width (`coarsen`), and the export lists every
layer it changed; the coarsened plan is an ordinary bit plan, so `moescope quantize --plan` and
`moescope evaluate` can measure what will really be served.

Each format module has `NAME`, `adjust(plan)` (what its quantiser does differently, in words, and
the plan as it can store it), `model_notes(plan, model)` (what it cannot store as planned for this
model) and `write(plan, notes, out, model_dir)` (the file's text). A new format is one module here.
A format that several loaders read differently (compressed-tensors: transformers, vLLM) also has
`for_target(target, model)`, which returns that interface for one loader, with the coarsening it
needs (`whole_model`: one width for every expert of the model; `widths`: the widths it can load).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from moescope.compress.export import compressed_tensors, llama_cpp, mlx
from moescope.compress.quant.memory import memory_estimate
from moescope.errors import MoescopeError
from moescope.output import write_atomic
from moescope.plans import SUPPORTED_BITS, UNQUANTISED, BitPlan

FORMATS = {module.NAME: module for module in (llama_cpp, compressed_tensors, mlx)}
COARSEN = ("up", "nearest", "down")
WIDTHS = (*SUPPORTED_BITS, UNQUANTISED)
PRINTED_NOTES = ("planned:", "exported:", llama_cpp.FALLBACK_NOTE, mlx.FALLBACK_NOTE, llama_cpp.SIZE_NOTE,
                 compressed_tensors.LOADER_NOTE)


@dataclass
class LayerChange:
    """A layer whose experts did not all have the width it is exported at."""

    layer: int
    planned: dict[int, int]  # bits -> experts planned at that width
    exported: int
    experts_changed: int

    def describe(self) -> str:
        mix = ", ".join(f"{count} at {bits}" for bits, count in sorted(self.planned.items()))
        return f"layer {self.layer}: {mix} bits -> all at {self.exported} ({self.experts_changed} experts changed)"


def one_width(bits: list[int], mode: str, widths: tuple[int, ...] = WIDTHS) -> int:
    """The single width a layer is served at: the mean of its experts' bits rounded up to one of
    `widths` ("up": never below plan on average), to the closest one ("nearest", ties up) or down."""
    mean = sum(bits) / len(bits)
    fitting = ([w for w in widths if w >= mean - 1e-9] if mode == "up" else
               [w for w in widths if w <= mean + 1e-9] if mode == "down" else list(widths))
    if not fitting:
        raise MoescopeError(f"an average of {mean:.2f} bits per expert rounds {mode} to none of the widths "
                            f"this target loads ({', '.join(map(str, widths))}): use --coarsen nearest or down")
    if mode == "up":
        return min(fitting)
    if mode == "down":
        return max(fitting)
    return min(fitting, key=lambda w: (abs(w - mean), -w))


def coarsen(plan: BitPlan, mode: str = "up", whole_model: bool = False,
            widths: tuple[int, ...] = WIDTHS) -> tuple[BitPlan, list[LayerChange]]:
    """`plan` with one width per layer (with `whole_model`, one width for every expert of the model),
    chosen among `widths`, and the layers that changed."""
    if mode not in COARSEN:
        raise MoescopeError(f"--coarsen must be one of {', '.join(COARSEN)}, not {mode!r}")
    model_width = one_width([b for bits in plan.layers.values() for b in bits], mode, widths) if whole_model else None
    layers, changes = {}, []
    for index, bits in sorted(plan.layers.items()):
        width = model_width or one_width(bits, mode, widths)
        layers[index] = [width] * len(bits)
        changed = sum(b != width for b in bits)
        if changed:
            planned = {b: bits.count(b) for b in set(bits)}
            changes.append(LayerChange(index, planned, width, changed))
    source = {**plan.source, "coarsened_from": plan.method, "coarsen": mode}
    if whole_model:
        source["one_width"] = "model"
    return replace(plan, layers=layers, source=source), changes


def change_lines(plan: BitPlan, coarse: BitPlan, changes: list[LayerChange]) -> list[str]:
    lines = [f"planned average {plan.average_bits():.3f} bits per expert weight, exported {coarse.average_bits():.3f}"]
    whole_model = coarse.source.get("one_width") == "model"
    if not changes:
        return lines + [f"every {'expert' if whole_model else 'layer'} already had one width: nothing changed"]
    why = ("to the one width the loader decodes every expert of the model with" if whole_model else
           "to one width (the runtime stores a layer's experts as one tensor)")
    return [*lines, f"{len(changes)} of {len(plan.layers)} layers coarsened {why}:",
            *("  " + c.describe() for c in changes)]


def export(plan: BitPlan, fmt: str, out: str | Path, mode: str = "up", model: nn.Module | None = None,
           model_dir: str | Path | None = None,
           target: str | None = None) -> tuple[BitPlan, list[LayerChange], list[str]]:
    """Write `plan` for runtime `fmt` to `out`; returns the coarsened plan, the changes and the notes.
    With `model` (a meta-device model works) the notes also give the packed size before and after,
    and for llama-cpp and mlx the layers whose expert tensors the runtime cannot store as planned.
    compressed-tensors needs `target` (the loader: transformers or vllm) and `model`, whose expert
    input sizes decide the group size and strategy the loader can decode."""
    if fmt not in FORMATS:
        raise MoescopeError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    runtime = FORMATS[fmt]
    if hasattr(runtime, "for_target"):
        runtime = runtime.for_target(target, model)
    elif target is not None:
        raise MoescopeError(f"--target names the loader of a compressed-tensors checkpoint; --format {fmt} has one "
                            "loader: leave --target out")
    coarse, changes = coarsen(plan, mode, getattr(runtime, "whole_model", False), getattr(runtime, "widths", WIDTHS))
    coarse, notes = runtime.adjust(coarse)
    heading = f"moescope export --format {fmt}" + (f" --target {target}" if target else "")
    notes = [f"{heading} (coarsen {mode})", *change_lines(plan, coarse, changes)[:1],
             *[c.describe() for c in changes], *notes]
    if model is not None:
        notes += [f"{name}: {memory_estimate(model, bits).format()}"
                  for name, bits in (("planned", plan), ("exported", coarse))]
        notes += runtime.model_notes(coarse, model)
    out = Path(out)
    write_atomic(out, runtime.write(coarse, notes, out, model_dir))
    return coarse, changes, notes
