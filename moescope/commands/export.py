"""`moescope export PLAN --format llama-cpp|compressed-tensors|mlx --out FILE`: a bit plan in a form runtimes
load, each layer coarsened to the one width runtimes can serve (moescope.compress.export);
compressed-tensors also names its loader with `--target transformers|vllm`.
`moescope export PROFILE --format eplb --out FILE.json`: a profile's per-layer expert load, the input of
DeepSeek's EPLB and SGLang's --init-expert-location (moescope.profiling.eplb)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moescope.backends.hf.loading import model_identity, model_on_meta
from moescope.commands.common import add_overwrite_argument
from moescope.compress.export import (
    COARSEN,
    FORMATS,
    PRINTED_NOTES,
    change_lines,
    compressed_tensors,
    export,
    llama_cpp,
)
from moescope.compress.quant.apply import check_plan
from moescope.errors import MoescopeError
from moescope.models.layout import text_config
from moescope.output import FILE, check_output
from moescope.plans import load_bit_plan, save_bit_plan
from moescope.profiling import eplb
from moescope.profiling.store import META_FILE, Profile

PROFILE_FORMATS = {eplb.NAME: eplb}  # what a profile directory exports to (bit plans: compress.export.FORMATS)

OUTPUTS = {"out": FILE, "coarsened_plan": FILE}
INPUTS = ("plan", "model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN|PROFILE",
                        help="bit plan JSON (moescope plan tiers / moescope quantize), or a profile directory for "
                        f"{', '.join(PROFILE_FORMATS)}")
    parser.add_argument("--format", required=True, choices=[*FORMATS, *PROFILE_FORMATS],
                        help="the runtime to export a bit plan for; eplb: a profile's expert load per layer for "
                        "DeepSeek EPLB / SGLang --init-expert-location")
    parser.add_argument("--out", required=True, help="file to write (.txt for llama-cpp, .yaml, .py for mlx, .json "
                        "for eplb)")
    parser.add_argument("--target", choices=compressed_tensors.TARGETS,
                        help="compressed-tensors only, and needed there: the loader the recipe must round-trip "
                        "through. transformers decodes every expert with one scheme, so the whole model gets one "
                        "expert width; vllm takes one per layer. Needs --model")
    parser.add_argument("--coarsen", default="up", choices=COARSEN,
                        help="how a layer with mixed widths becomes one width: the mean rounded up (default; never "
                        "fewer bits on average than planned), to the nearest width, or down")
    parser.add_argument("--coarsened-plan", metavar="FILE",
                        help="also write the coarsened plan as a bit plan, to quantize and evaluate what is served")
    parser.add_argument("--model", metavar="MODEL_DIR",
                        help="check that the plan fits this checkpoint (reads its config, not its weights), print "
                        "the packed sizes and, for llama-cpp and mlx, the expert tensors the runtime cannot store "
                        "as planned; compressed-tensors needs it to fit the group size to every input size")
    add_overwrite_argument(parser, "--out, its notes and --coarsened-plan")


def run(args: argparse.Namespace) -> int:
    if args.format in PROFILE_FORMATS:
        return export_profile(args)
    if (Path(args.plan) / META_FILE).is_file():
        raise MoescopeError(f"{args.plan} is a profile: it exports to {', '.join(PROFILE_FORMATS)}; a bit plan "
                            f"(moescope plan tiers) exports to {args.format}")
    if args.format == "llama-cpp":  # the notes file beside --out is an output too
        check_output(llama_cpp.notes_path(Path(args.out)), overwrite=args.overwrite,
                     sources=[s for s in (args.plan, args.model, args.coarsened_plan) if s])
    model = model_on_meta(args.model) if args.model else None
    plan = load_bit_plan(args.plan)
    if model is not None:
        check_plan(plan, model)
    coarse, changes, notes = export(plan, args.format, args.out, args.coarsen, model, args.model, args.target)
    if args.coarsened_plan:
        save_bit_plan(coarse, args.coarsened_plan)
    for line in change_lines(plan, coarse, changes) + [n for n in notes if n.startswith(PRINTED_NOTES)]:
        print(line)
    if args.format == "llama-cpp":
        print(f"wrote the notes and the commands (convert, llama-quantize, llama-perplexity) to "
              f"{llama_cpp.notes_path(Path(args.out))}")
    if args.coarsened_plan:
        print(f"wrote the coarsened plan to {args.coarsened_plan}")
    print(f"wrote {args.out}")
    return 0


def export_profile(args: argparse.Namespace) -> int:
    """A profile export; with --model, rows for all its layers (else up to the last MoE layer)."""
    profile = Profile.load(args.plan)
    layers = None
    if args.model:
        model = model_on_meta(args.model)
        profile.model.require(model_identity(model), "profile")
        layers = text_config(model.config).num_hidden_layers
    matrix = PROFILE_FORMATS[args.format].write(profile, args.out, layers)
    print(f"wrote the expert load of {len(profile.layers)} MoE layers ({matrix.shape[0]} rows x {matrix.shape[1]} "
          f"experts, {int(profile.counters['tokens'].sum())} tokens) to {args.out}")
    return 0
