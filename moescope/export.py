"""`moescope export PLAN --format llama-cpp|compressed-tensors|mlx --out FILE`: a bit plan in a form runtimes load.

A bit plan gives every expert its own width, but llama.cpp, vLLM (compressed-tensors) and MLX all
store a layer's experts as one fused tensor with one quantisation type: none can serve two widths
inside it. So each layer is first coarsened to one width (`coarsen`), and the export lists every
layer it changed. `--coarsened-plan` writes the coarsened plan as an ordinary bit plan, so
`moescope quantize --plan` and `moescope evaluate` can measure what will really be served.

- llama-cpp: a `--tensor-type-file` for `llama-quantize` (lines `REGEX=TYPE` over GGUF tensor names
  such as `blk.3.ffn_down_exps.weight`, first match wins, the last line `.*` for the other tensors;
  llama-quantize reads every word as a rule, so the notes and the command go to FILE.notes.txt
  beside it). llama.cpp types have fixed block sizes, not the plan's. Checked with llama.cpp's own
  llama-quantize (docs/quantization.md).
- compressed-tensors: an llm-compressor recipe (YAML) with one `QuantizationModifier` config group
  per width, targeting each layer's expert Linear modules by regex (PyYAML comes with transformers).
- mlx: a Python file defining `quant_predicate(path, module, config)` for mlx-lm's converter,
  returning `{"bits", "group_size"}` for each layer's `switch_mlp` and False for what stays unquantised.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from moescope.errors import MoescopeError
from moescope.output import write_atomic
from moescope.quantize import (
    SHRINK_FACTORS,
    SUPPORTED_BITS,
    UNQUANTISED,
    BitPlan,
    format_bytes,
    load_bit_plan,
    memory_estimate,
)

if TYPE_CHECKING:
    from torch import nn

FORMATS = ("llama-cpp", "compressed-tensors", "mlx")
COARSEN = ("up", "nearest", "down")
WIDTHS = (*SUPPORTED_BITS, UNQUANTISED)
GGML_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 8: "q8_0", UNQUANTISED: "bf16"}
GGML_BLOCK = {"q2_K": 256, "q3_K": 256, "q4_K": 256, "q8_0": 32}  # weights per block along a row
# What llama-quantize stores instead when a row is not a whole number of blocks (tensor_type_fallback
# in llama.cpp's src/llama-quant.cpp, 2026; older builds chose iq4_nl for q2_K and q3_K).
GGML_FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q8_0": "f16"}
# Bits per weight of each ggml type, block scales included (gguf-py's GGML_QUANT_SIZES).
GGML_BITS = {"q2_K": 2.625, "q3_K": 3.4375, "q4_K": 4.5, "q8_0": 8.5, "q4_0": 4.5, "q5_0": 5.5, "f16": 16.0,
             "bf16": 16.0}
FALLBACK_NOTES = ("llama.cpp fallback:", "mlx fallback:")  # notes the CLI prints too
LLAMA_CPP_SIZE = "llama.cpp packed size:"
MLX_GROUP_SIZES = (32, 64, 128)


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


def one_width(bits: list[int], mode: str) -> int:
    """The single width a layer is served at: the mean of its experts' bits rounded up to a supported
    width ("up": never below plan on average), to the closest one ("nearest", ties up) or down."""
    mean = sum(bits) / len(bits)
    if mode == "up":
        return min(w for w in WIDTHS if w >= mean - 1e-9)
    if mode == "down":
        return max(w for w in WIDTHS if w <= mean + 1e-9)
    return min(WIDTHS, key=lambda w: (abs(w - mean), -w))


def coarsen(plan: BitPlan, mode: str = "up") -> tuple[BitPlan, list[LayerChange]]:
    """`plan` with one width per layer, and the layers that changed."""
    if mode not in COARSEN:
        raise MoescopeError(f"--coarsen must be one of {', '.join(COARSEN)}, not {mode!r}")
    layers, changes = {}, []
    for index, bits in sorted(plan.layers.items()):
        width = one_width(bits, mode)
        layers[index] = [width] * len(bits)
        changed = sum(b != width for b in bits)
        if changed:
            planned = {b: bits.count(b) for b in set(bits)}
            changes.append(LayerChange(index, planned, width, changed))
    source = {**plan.source, "coarsened_from": plan.method, "coarsen": mode}
    return replace(plan, layers=layers, source=source), changes


def average_bits(plan: BitPlan) -> float:
    """Mean bits over all experts (the experts of a model are the same size)."""
    bits = [b for layer in plan.layers.values() for b in layer]
    return sum(bits) / len(bits)


def summary_lines(plan: BitPlan, coarse: BitPlan, changes: list[LayerChange]) -> list[str]:
    lines = [f"planned average {average_bits(plan):.3f} bits per expert weight, exported {average_bits(coarse):.3f}"]
    if not changes:
        return lines + ["every layer already had one width: nothing changed"]
    return lines + [f"{len(changes)} of {len(plan.layers)} layers coarsened to one width (the runtime stores a "
                    "layer's experts as one tensor):"] + ["  " + c.describe() for c in changes]


# ---------------------------------------------------------------- formats


def llama_cpp(plan: BitPlan) -> str:
    """A `llama-quantize --tensor-type-file`: one `REGEX=TYPE` per line. llama-quantize gives a tensor
    the type of the first rule whose regex it contains (so the names are anchored: an unanchored
    `output\\.weight` also catches `blk.0.attn_output.weight`), each layer's expert tensors first,
    then the embeddings and the output, then `.*` for every other quantisable tensor (attention,
    shared experts, dense layers) at the plan's `non_expert_bits`: every tensor is named, and
    llama.cpp's own mixture rules (which raise attn_v and ffn_down) change nothing. Norms and routers
    are never quantised by llama-quantize. The file is split on whitespace and every word is a
    rule, so it holds no comments."""
    lines = [f"^blk\\.{index}\\.ffn_(gate|up|down)_exps\\.weight$={GGML_TYPES[bits[0]]}"
             for index, bits in sorted(plan.layers.items())]
    lines += [f"^token_embd\\.weight$={GGML_TYPES[UNQUANTISED]}", f"^output\\.weight$={GGML_TYPES[UNQUANTISED]}",
              f".*={GGML_TYPES[plan.non_expert_bits]}"]
    return "\n".join(lines) + "\n"


def ggml_served(ggml: str, inputs: int) -> str:
    """The type llama-quantize stores a tensor as when asked for `ggml`, given its rows' length."""
    if ggml not in GGML_BLOCK or inputs % GGML_BLOCK[ggml] == 0:
        return ggml
    return GGML_FALLBACK[ggml] if inputs % 32 == 0 else "f16"  # the fallbacks have blocks of 32


def llama_cpp_notes(plan: BitPlan, model: nn.Module) -> list[str]:
    """What llama-quantize will really store: a note per layer whose expert tensors get a fallback type
    (rows that are not a whole number of the type's blocks), one for the other linear layers, and the
    packed size at ggml's own bits per weight (block scales included, fallbacks counted)."""
    from moescope.models import find_moe_layers
    from moescope.quantize import expert_weights, non_expert_linears

    notes, expert_bytes, other_bytes = [], 0.0, 0.0
    for layer in find_moe_layers(model):
        ggml = GGML_TYPES[plan.layers[layer.index][0]]
        served = [(w, ggml_served(ggml, w.shape[1])) for w in expert_weights(layer)]
        expert_bytes += sum(w.view.numel() * GGML_BITS[kind] / 8 for w, kind in served)
        odd = [f"{w.name} (rows of {w.shape[1]})" for w, kind in served if kind != ggml]
        if odd:
            notes.append(f"{FALLBACK_NOTES[0]} layer {layer.index}: {', '.join(odd)} not a multiple of "
                         f"{GGML_BLOCK[ggml]}: llama-quantize stores them as "
                         f"{'/'.join(sorted({k for _, k in served if k != ggml}))}, not {ggml}")
    ggml = GGML_TYPES[plan.non_expert_bits]
    fallen: dict[str, list[str]] = {}  # fallback type -> names of the linear layers stored at it
    for name, linear in non_expert_linears(model):
        kind = ggml_served(ggml, linear.in_features)
        other_bytes += linear.weight.numel() * GGML_BITS[kind] / 8
        if kind != ggml:
            fallen.setdefault(kind, []).append(name)
    for kind, names in sorted(fallen.items()):
        notes.append(f"{FALLBACK_NOTES[0]} {len(names)} other linear layers ({names[0]}, ...) have rows that are not "
                     f"a multiple of {GGML_BLOCK[ggml]}: llama-quantize stores them as {kind}, not {ggml}")
    rest = memory_estimate(model, plan).other_bytes
    notes.append(f"{LLAMA_CPP_SIZE} {format_bytes(expert_bytes + other_bytes + rest)} at ggml's bits per weight "
                 f"(experts {format_bytes(expert_bytes)}, other linear {format_bytes(other_bytes)}, "
                 f"rest {format_bytes(rest)})")
    return notes


def mlx_unquantised(plan: BitPlan, model: nn.Module) -> list[str]:
    """One note per layer with expert matrices the predicate leaves unquantised: inputs that are
    neither a multiple of the group size nor one smaller group MLX supports (its `group_size`)."""
    from moescope.models import find_moe_layers
    from moescope.quantize import expert_weights

    notes = []
    for layer in find_moe_layers(model):
        sizes = [(w.name, w.shape[1]) for w in expert_weights(layer)]
        odd = [f"{name} ({size} inputs)" for name, size in sizes if plan.layers[layer.index][0] != UNQUANTISED
               and size % plan.group_size and not (size < plan.group_size and size in MLX_GROUP_SIZES)]
        if odd:
            notes.append(f"{FALLBACK_NOTES[1]} layer {layer.index}: {', '.join(odd)} do not split "
                         f"into groups of {plan.group_size}: mlx-lm leaves them unquantised")
    return notes


def notes_path(out: Path) -> Path:
    """Where the llama-cpp export's notes go: beside the type file, which cannot hold comments."""
    return out.with_name(out.name + ".notes.txt")


def llama_cpp_usage(plan: BitPlan, out: Path) -> str:
    base = "Q8_0" if plan.non_expert_bits == UNQUANTISED else GGML_TYPES[plan.non_expert_bits].upper()
    return (f"usage: llama-quantize --tensor-type-file {out.name} model-bf16.gguf model-out.gguf {base} "
            "(the positional type must be a quantised one: llama-quantize applies the file's rules only then; "
            "the rules name every tensor, so it only labels the file); builds without --tensor-type-file take "
            f"the same rules as `$(sed 's/^/--tensor-type /' {out.name})`")


def expert_regex(layer: int, name: str = "[^.]+") -> str:
    """Module names of one layer's routed experts (all, or those called `name`), in the checkpoint's
    per-expert naming (`model.layers.3.mlp.experts.7.down_proj`, Mixtral's `block_sparse_moe.experts.7.w2`);
    shared experts (`shared_experts`, `shared_expert`) do not match."""
    return f"re:.*layers\\.{layer}\\.[^.]+\\.experts\\.\\d+\\.{name}$"


def checkpoint_expert_inputs(model_dir: str | Path) -> dict[tuple[int, str], int]:
    """(decoder layer, module name) -> input size of the checkpoint's per-expert Linear weights, in its own
    naming (`model.layers.3.mlp.experts.7.down_proj.weight` -> (3, "down_proj")), from the headers only.
    Empty for checkpoints that store experts fused."""
    import re

    from moescope.checkpoint import shapes

    pattern = re.compile(r"layers\.(\d+)\.[^.]+\.experts\.\d+\.([^.]+)\.weight$")
    found = {}
    for key, shape in shapes(Path(model_dir)).items():
        match = pattern.search(key)
        if match and len(shape) == 2:
            found[(int(match[1]), match[2])] = shape[1]
    return found


def compressed_tensors(plan: BitPlan, notes: list[str], inputs: dict[tuple[int, str], int] | None = None) -> str:
    """An llm-compressor recipe (YAML): one config group per width (and strategy) over the layers at that width.

    llm-compressor needs the group size to divide a weight's input size. With `inputs` (`checkpoint_expert_inputs`),
    a module whose input is smaller than the group gets the "channel" strategy, one scale per output
    row, which is what moescope's quantiser does with such a row (one short group); one whose input is
    larger but not a multiple is refused. Without them every layer is one group-strategy target."""
    import yaml

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


MLX_TEMPLATE = '''"""mlx-lm quantisation predicate from a moescope bit plan.

    from mlx_lm import convert
    from {module} import quant_predicate
    convert(HF_PATH, mlx_path=OUT, quantize=True, q_group_size=32, quant_predicate=quant_predicate)

q_group_size=32 whatever the plan's group size: mlx-lm skips every module whose inputs are not a
multiple of q_group_size before it asks the predicate, and the predicate gives each module its own.
"""

import re

{notes}
EXPERT_BITS = {layers}  # decoder layer -> bits of its experts (switch_mlp)
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
    if path.endswith((".gate", "shared_expert_gate")) or "embed" in path or "lm_head" in path:
        return False  # routers, embeddings and the head stay as they are
    if ".switch_mlp." in path:
        bits = EXPERT_BITS.get(int(LAYER.search(path).group(1)))
    else:
        bits = OTHER_BITS
    return False if bits is None else {{"bits": bits, "group_size": group_size(module.weight.shape[-1])}}
'''


def mlx(plan: BitPlan, notes: list[str], out: Path) -> str:
    def bits_or_none(bits: int) -> int | None:
        return None if bits == UNQUANTISED else bits

    layers = {index: bits_or_none(bits[0]) for index, bits in sorted(plan.layers.items())}
    module = out.stem if out.stem.isidentifier() else f"{out.stem.replace('-', '_')}  # after renaming the file"
    return MLX_TEMPLATE.format(module=module, notes="".join(f"# {line}\n" for line in notes), layers=layers,
                               group_size=plan.group_size, other=bits_or_none(plan.non_expert_bits))


def format_notes(plan: BitPlan, fmt: str) -> tuple[BitPlan, list[str]]:
    """Format-level adjustments (what a runtime's quantiser cannot do as planned), said in plain words.
    The adjusted plan is the one `--coarsened-plan` writes, so evaluating it measures what is served."""
    if fmt == "llama-cpp":
        return plan, ["llama.cpp types use fixed blocks (256 weights for k-quants, 32 for q8_0); the plan's "
                      f"group size {plan.group_size} and {plan.scales} scales do not apply (llama-quantize fits each "
                      "block's scales itself), and it gives tensors whose rows are not a multiple of 256 a fallback "
                      "type instead of a k-quant"]
    notes = []
    if fmt == "compressed-tensors" and plan.scales == "mse":
        notes.append("mse scales: llm-compressor's mse observer minimises |error|^2.4 on a finer grid of ranges "
                     "than moescope's squared-error search, so its ranges can differ slightly")
    if fmt == "compressed-tensors" and not plan.symmetric:
        notes.append("asymmetric: compressed-tensors stretches each group's range to include 0 and rounds the zero "
                     "point to an integer, so its grid differs from moescope's (the group's own min and max, a "
                     "float offset); quantize --plan measures moescope's grid, not what llm-compressor writes")
    if fmt == "mlx" and plan.group_size not in MLX_GROUP_SIZES:
        size = min(MLX_GROUP_SIZES, key=lambda g: abs(g - plan.group_size))
        notes.append(f"MLX supports group sizes {MLX_GROUP_SIZES}: the plan's {plan.group_size} is exported as {size}")
        plan = replace(plan, group_size=size)
    if fmt == "mlx" and (plan.symmetric or plan.scales != "mlx"):
        notes.append("MLX's affine quantisation keeps a scale and a bias per group, keeps each group's extreme of "
                     "larger magnitude exactly and puts zero on the grid: the coarsened plan is asymmetric with "
                     f"scales \"mlx\" (was {'symmetric' if plan.symmetric else 'asymmetric'}, {plan.scales}), so "
                     "quantize --plan reproduces the weights mlx-lm serves")
        plan = replace(plan, symmetric=False, scales="mlx")
    return plan, notes


def export(plan: BitPlan, fmt: str, out: str | Path, mode: str = "up", model: nn.Module | None = None,
           model_dir: str | Path | None = None) -> tuple[BitPlan, list[LayerChange], list[str]]:
    """Write `plan` for runtime `fmt` to `out`; returns the coarsened plan, the changes and the notes.
    With `model` (a meta-device model works) the notes also give the packed size before and after,
    and for llama-cpp and mlx the layers whose expert tensors the runtime cannot store as planned. With
    `model_dir` (its checkpoint), the compressed-tensors recipe fits each expert module's input size."""
    if fmt not in FORMATS:
        raise MoescopeError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    coarse, changes = coarsen(plan, mode)
    coarse, notes = format_notes(coarse, fmt)
    notes = [f"moescope export --format {fmt} (coarsen {mode})", *summary_lines(plan, coarse, changes)[:1],
             *[c.describe() for c in changes], *notes]
    if model is not None:
        notes += [f"{name}: {memory_estimate(model, bits).format()}"
                  for name, bits in (("planned", plan), ("exported", coarse))]
    out = Path(out)
    if fmt == "llama-cpp":
        notes += llama_cpp_notes(coarse, model) if model is not None else []
        text = llama_cpp(coarse)
        notes.append(llama_cpp_usage(coarse, out))
        write_atomic(notes_path(out), "".join(f"{line}\n" for line in notes))
    elif fmt == "compressed-tensors":
        inputs = checkpoint_expert_inputs(model_dir) if model_dir is not None else {}
        if not inputs:
            notes.append("expert input sizes not checked (no --model, or its experts are stored fused): "
                         "llm-compressor needs the group size to divide every expert module's input")
        text = compressed_tensors(coarse, notes, inputs)
    else:
        notes += mlx_unquantised(coarse, model) if model is not None else []
        text = mlx(coarse, notes, out)
    write_atomic(out, text)
    return coarse, changes, notes


def model_on_meta(model_dir: str | Path):
    """The model built from its config on the meta device (no weights read), to check a plan against."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moescope.loading import check_checkpoint_dir

    config = AutoConfig.from_pretrained(check_checkpoint_dir(model_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="bit plan JSON (moescope plan tiers / moescope quantize)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the runtime to export for")
    parser.add_argument("--out", required=True, help="file to write (.txt for llama-cpp, .yaml, .py for mlx)")
    parser.add_argument("--coarsen", default="up", choices=COARSEN,
                        help="how a layer with mixed widths becomes one width: the mean rounded up (default; never "
                        "fewer bits on average than planned), to the nearest width, or down")
    parser.add_argument("--coarsened-plan", metavar="FILE",
                        help="also write the coarsened plan as a bit plan, to quantize and evaluate what is served")
    parser.add_argument("--model", metavar="MODEL_DIR",
                        help="check that the plan fits this checkpoint (reads its config, not its weights), print "
                        "the packed sizes and, for llama-cpp and mlx, the expert tensors the runtime cannot store "
                        "as planned")


def run(args: argparse.Namespace) -> int:
    from moescope.quantize import save_bit_plan

    model = model_on_meta(args.model) if args.model else None
    plan = load_bit_plan(args.plan, model)
    coarse, changes, notes = export(plan, args.format, args.out, args.coarsen, model, args.model)
    if args.coarsened_plan:
        save_bit_plan(coarse, args.coarsened_plan)
    printed = ("planned:", "exported:", *FALLBACK_NOTES, LLAMA_CPP_SIZE)
    for line in summary_lines(plan, coarse, changes) + [n for n in notes if n.startswith(printed)]:
        print(line)
    if args.format == "llama-cpp":
        print(f"wrote the notes and the llama-quantize command to {notes_path(Path(args.out))}")
    if args.coarsened_plan:
        print(f"wrote the coarsened plan to {args.coarsened_plan}")
    print(f"wrote {args.out}")
    return 0
