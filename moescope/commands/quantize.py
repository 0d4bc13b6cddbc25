"""`moescope quantize MODEL_DIR (--plan bits.json | --bits 4 | --budget 3.0 --profile P) --out OUT_DIR`.

Writes a fake-quantised checkpoint (the model's own dtype and key layout, next to the source's
config and tokenizer files) plus the plan it applied, and prints what the real packed model would
take. The quantiser and allocation live in `moescope.compress.quant`, bit plans in `moescope.plans`.
With `--backend mlx` it writes a really quantised mlx-lm model instead, one width per layer, or with
`--per-expert` each expert at its own width (`moescope.compress.mlx_quantize`), and sets its size on
disk against the plan's arithmetic.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from torch import nn

from moescope.analysis.criteria import CRITERIA
from moescope.backends.hf.loading import Placement, load_model, load_tokenizer, model_on_meta, size_in_bytes
from moescope.checkpoints import check_checkpoint_dir
from moescope.commands.common import POSITIVE_INT, add_overwrite_argument, add_placement_arguments, placement_from_args
from moescope.compress.checkpoint import CHECKPOINT, save_model_checkpoint
from moescope.compress.export import COARSEN, change_lines
from moescope.compress.mlx_quantize import quantize_mlx
from moescope.compress.quant.allocation import budget_plan
from moescope.compress.quant.apply import apply_bit_plan, uniform_plan
from moescope.compress.quant.distortion import allocation_inputs
from moescope.compress.quant.memory import memory_estimate
from moescope.errors import MoescopeError
from moescope.plans import (
    SCALES,
    SUPPORTED_BITS,
    UNQUANTISED,
    BitPlan,
    QuantOptions,
    bit_plan_text,
    check_bits,
    load_bit_plan,
)

OUTPUTS = {"out": CHECKPOINT}
INPUTS = ("model_dir", "plan", "profile", "calibration")


def parse_budget(text: str) -> tuple[float | None, float | None]:
    """(average bits, None) for "3.0", (None, bytes) for a size such as "12GB", "800 MB" or "20GiB"."""
    size = size_in_bytes(text) if re.search("[A-Za-z]", text) else None
    if size:
        return None, float(size)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise MoescopeError(f"--budget {text!r}: give average bits (3.0) or a size (12GB, 800MB), above zero")
    return number, None


def parse_bit_choices(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted(check_bits(int(b), "--bit-choices") for b in text.split(",")))
    except ValueError:
        raise MoescopeError(f"--bit-choices {text!r}: give bit widths such as 2,3,4,8") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint directory")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", metavar="BITS_JSON", help="bit plan (from `moescope tiers` or a budget)")
    which.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help="every expert at this many bits")
    which.add_argument("--budget", help="allocate bits under a budget: average bits (3.0) or a size (12GB); "
                       "needs --profile")
    parser.add_argument("--profile", metavar="PROFILE_DIR", help="with --budget: where expert importance comes from")
    parser.add_argument("--importance", choices=(*CRITERIA, "fisher"), default="gate-energy",
                        help="with --budget: what makes an expert important (default gate-energy); fisher: "
                        "gradients of the --calibration loss weigh each weight's error (no profile needed)")
    parser.add_argument("--calibration", metavar="JSONL", help="with --budget: measure each expert's output error "
                        "on these prompts (default: its weight error)")
    parser.add_argument("--calibration-tokens", type=POSITIVE_INT, default=16384,
                        help="tokens of --calibration to use")
    parser.add_argument("--bit-choices", default="2,3,4,8", help="with --budget: the bit widths to choose from")
    parser.add_argument("--per-layer", action="store_true",
                        help="with --budget: one width per layer, which llama.cpp, vLLM and MLX can serve")
    parser.add_argument("--group-size", type=POSITIVE_INT, default=128,
                        help="inputs per scale (default 128; not with --plan)")
    parser.add_argument("--asymmetric", action="store_true", help="a scale and an offset per group (not with --plan)")
    parser.add_argument("--scales", choices=SCALES, default="minmax",
                        help="minmax: each group's range from its extremes (default); mse: search each group's "
                        "clipping range for the least squared error, better at 2-3 bits and slower; mlx: MLX's affine "
                        "rule, with --asymmetric, to measure what mlx-lm will serve (not with --plan)")
    parser.add_argument("--non-expert-bits", type=int, default=UNQUANTISED, choices=(*SUPPORTED_BITS, UNQUANTISED),
                        help="attention and shared-expert linear layers (default 16: unquantised; not with --plan)")
    add_placement_arguments(parser, dtype_help="the checkpoint's own; the written checkpoint has this dtype")
    parser.add_argument("--backend", choices=("hf", "mlx"), default="hf",
                        help="hf (default): a fake-quantised checkpoint in the source's own layout; mlx: a really "
                        "quantised mlx-lm model (needs moescope[mlx]), each layer at one width")
    parser.add_argument("--coarsen", choices=COARSEN, default="up",
                        help="with --backend mlx: how a layer with mixed widths becomes one (as `export`; default up)")
    parser.add_argument("--per-expert", action="store_true",
                        help="with --backend mlx: keep every expert's own width instead of coarsening, packed in one "
                        "group per width and layer; `moescope.load` and moescope's commands open it, stock mlx-lm "
                        "does not (docs/mlx.md)")
    parser.add_argument("--out", required=True, metavar="OUT_DIR",
                        help="directory for the fake-quantised checkpoint (the mlx-lm model with --backend mlx)")
    add_overwrite_argument(parser, "OUT_DIR")


def allocated_plan(model: nn.Module, args: argparse.Namespace, options: QuantOptions) -> BitPlan:
    """The `--budget` plan: importance from the profile, distortion measured on the model."""
    avg_bits, max_bytes = parse_budget(args.budget)
    choices = parse_bit_choices(args.bit_choices)
    tokenizer = load_tokenizer(args.model_dir) if args.calibration else None
    importance, distortion, source = allocation_inputs(model, args.importance, args.profile, choices, options,
                                                       args.calibration, tokenizer, args.calibration_tokens)
    source["budget"] = args.budget
    return budget_plan(model, importance, distortion, choices, avg_bits=avg_bits, max_bytes=max_bytes,
                       options=options, per_layer=args.per_layer, source=source)


def run(args: argparse.Namespace) -> int:
    source, out = check_checkpoint_dir(args.model_dir), Path(args.out)
    placement = placement_from_args(args)
    if args.coarsen != "up" and args.backend != "mlx":
        raise MoescopeError("--coarsen applies to --backend mlx (the fake-quantised checkpoint keeps each width)")
    if args.per_expert and (args.backend != "mlx" or args.coarsen != "up"):
        raise MoescopeError("--per-expert applies to --backend mlx, without --coarsen (nothing is coarsened; the "
                            "fake-quantised checkpoint of --backend hf keeps each width anyway)")
    if args.budget:
        parse_budget(args.budget)  # fail on a bad budget before loading the weights
    if args.plan:
        set_by_plan = {"--group-size": args.group_size != 128, "--asymmetric": args.asymmetric,
                       "--scales": args.scales != "minmax", "--non-expert-bits": args.non_expert_bits != UNQUANTISED}
        if any(set_by_plan.values()):
            flags = ", ".join(flag for flag, given in set_by_plan.items() if given)
            raise MoescopeError(f"{flags}: with --plan the plan says how to quantise (its group_size, symmetric, "
                                "scales and non_expert_bits); edit the plan or leave these out")
    plan = load_bit_plan(args.plan) if args.plan else None  # and on a bad plan
    options = QuantOptions(args.group_size, not args.asymmetric, args.non_expert_bits, args.scales)
    if args.backend == "mlx":
        return run_mlx(args, source, out, plan, options, placement)
    model = load_model(source, placement)
    if args.bits:
        plan = uniform_plan(model, args.bits, options)
    elif args.budget:
        plan = allocated_plan(model, args, options)
    apply_bit_plan(model, plan)  # checks first that the plan is for this model
    save_model_checkpoint(model, source, out, {"bit_plan.json": bit_plan_text(plan)}, overwrite=args.overwrite)
    print(f"wrote a fake-quantised checkpoint ({plan.method} plan) to {out}")
    print(memory_estimate(model, plan).format())
    return 0


def run_mlx(args: argparse.Namespace, source: Path, out: Path, plan: BitPlan | None, options: QuantOptions,
            placement: Placement) -> int:
    """`--backend mlx`: the plan (or the --bits / --budget one) written as a really quantised mlx-lm model."""
    if args.dtype:
        raise MoescopeError("--dtype: with --backend mlx the model keeps the checkpoint's dtype (that of its scales)")
    if args.bits:
        plan = uniform_plan(model_on_meta(source), args.bits, options)
    elif args.budget:
        plan = allocated_plan(load_model(source, placement), args, options)
    result = quantize_mlx(source, out, plan, args.coarsen, args.overwrite, args.per_expert)
    for line in change_lines(plan, result.plan, [])[:1] + result.notes + result.lines():
        print(line)
    kind = "an mlx model with per-expert widths (open it with moescope.load)" if args.per_expert else "an mlx-lm model"
    print(f"wrote {kind} ({plan.method} plan, {result.plan.average_bits():.2f} average bits as served) to "
          f"{out}; the plan as served: {out / 'bit_plan.json'}")
    return 0
