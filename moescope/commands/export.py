"""`moescope export PLAN --format llama-cpp|compressed-tensors|mlx --out FILE`: a bit plan in a form runtimes
load, each layer coarsened to the one width runtimes can serve (moescope.compress.export);
compressed-tensors also names its loader with `--target transformers|vllm`."""

from __future__ import annotations

import argparse
from pathlib import Path

from moescope.backends.hf.loading import model_on_meta
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
from moescope.plans import load_bit_plan, save_bit_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="bit plan JSON (moescope plan tiers / moescope quantize)")
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="the runtime to export for")
    parser.add_argument("--out", required=True, help="file to write (.txt for llama-cpp, .yaml, .py for mlx)")
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


def run(args: argparse.Namespace) -> int:
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
