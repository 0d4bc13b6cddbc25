"""`moescope sweep prune|quant MODEL_DIR --profile P --out DIR`: perplexity per domain against how much is
compressed, per criterion or plan, as CSV and SVG (moescope.judge.sweep explains both sweeps)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moescope.analysis.criteria import CRITERIA
from moescope.analysis.merging import MERGE_METHODS
from moescope.commands.common import (
    FINITE,
    POSITIVE_INT,
    SHARE,
    add_overwrite_argument,
    add_protocol_arguments,
    bounded,
    list_of,
    protocol_from_args,
)
from moescope.compress.prune import METHODS
from moescope.compress.repair import REPAIR_STEPS
from moescope.errors import MoescopeError
from moescope.judge import sweep as sweep_module
from moescope.judge.sweep import sweep_prune, sweep_quant, write_csv
from moescope.output import OutputKind, atomic_directory, write_atomic
from moescope.plans import SCALES
from moescope.report.charts import plot_sweep

SWEEP = OutputKind("sweep", directory=True, is_own=lambda path: (path / "sweep.csv").is_file())
OUTPUTS = {"out": SWEEP}
INPUTS = ("model_dir", "profile", "calibration", "data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sweep_kind", metavar="KIND", required=True)
    prune = sub.add_parser("prune", help="perplexity per domain vs share of experts pruned or merged, per method",
                           description=sweep_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("model_dir", metavar="MODEL_DIR")
    prune.add_argument("--profile", required=True, help="profile directory of this model")
    prune.add_argument("--ratios", type=list_of(SHARE), default="0.02,0.05,0.1,0.15,0.25",
                       help="shares of experts to prune per layer, each in [0, 1)")
    prune.add_argument("--criteria", type=list_of(str), default="frequency,gate-mass,saliency",
                       help="comma-separated criteria")
    prune.add_argument("--methods", "--method", dest="methods", type=list_of(str), default="remove",
                       help=f"comma-separated methods to compare, of {', '.join(METHODS)} (default remove)")
    prune.add_argument("--merge-methods", type=list_of(str), default="hc-smoe",
                       help=f"with merge: comma-separated groupings, of {', '.join(MERGE_METHODS)}")
    prune.add_argument("--repair", action="store_true",
                       help="also evaluate each written checkpoint after router repair")
    prune.add_argument("--repair-steps", type=POSITIVE_INT, default=REPAIR_STEPS, help="L-BFGS steps per router")
    prune.add_argument("--offset", type=FINITE, default=2.0, help="logit offset for --method soft")
    prune.add_argument("--calibration", help="JSONL text for the ablation criterion, merged router rows and repair")
    prune.add_argument("--calibration-prompts", type=POSITIVE_INT, default=128,
                       help="prompts spread over --calibration for merging and repair (default 128)")
    prune.add_argument("--out", required=True, help="directory for sweep.csv and sweep.svg")
    quant = sub.add_parser("quant", help="perplexity per domain vs average bits: uniform, tiered, budget-allocated",
                           description=sweep_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quant.add_argument("model_dir", metavar="MODEL_DIR")
    quant.add_argument("--profile", help="profile directory of this model (expert importance; not needed with "
                       "--importance fisher)")
    quant.add_argument("--bits", type=list_of(bounded(float, 2, 8)), default="2.5,3,4",
                       help="average bits per expert weight to compare plans at, each in [2, 8]")
    quant.add_argument("--importance", default="gate-energy",
                       choices=(*CRITERIA, "fisher"),
                       help="what ranks experts (default gate-energy); fisher: squared gradients of the --calibration "
                       "loss weigh each weight's error, as `moescope quantize --importance fisher`")
    quant.add_argument("--calibration", help="JSONL: allocate on output error on these prompts (default: weight error; "
                       "with --importance fisher, the prompts the gradients come from)")
    quant.add_argument("--scales", choices=SCALES, default="minmax",
                       help="how every plan's group scales are set, as `moescope quantize --scales` (default minmax)")
    quant.add_argument("--asymmetric", action="store_true", help="a scale and an offset per group in every plan")
    quant.add_argument("--out", required=True, help="directory for sweep.csv and sweep.svg")
    for kind in (prune, quant):
        add_protocol_arguments(kind)
        add_overwrite_argument(kind, "--out")


def run(args: argparse.Namespace) -> int:
    if args.sweep_kind == "quant":
        rows = sweep_quant(args.model_dir, args.profile, args.bits, args.data,
                           protocol_from_args(args), args.importance, args.calibration, args.scales,
                           not args.asymmetric)
        plot = plot_sweep([r for r in rows if r["plan"] != "original"], x="target_bits", series="plan",
                          xlabel="average bits per expert weight", reference="original")
    else:
        unknown = [m for m in args.methods if m not in METHODS] + \
            [m for m in args.merge_methods if m not in MERGE_METHODS]
        if unknown or not args.methods:
            raise MoescopeError(f"--methods {','.join(args.methods)} / --merge-methods {','.join(args.merge_methods)}: "
                                f"use methods of {', '.join(METHODS)} and merge methods of {', '.join(MERGE_METHODS)}")
        rows = sweep_prune(args.model_dir, args.profile, args.ratios, args.criteria, args.methods, args.data,
                           protocol_from_args(args), args.calibration, args.offset,
                           merge_methods=tuple(args.merge_methods), repair=args.repair,
                           calibration_prompts=args.calibration_prompts, repair_steps=args.repair_steps)
        plot = plot_sweep(rows, series="variant")
    out = Path(args.out)
    with atomic_directory(out, SWEEP, args.overwrite) as work:
        write_csv(rows, work / "sweep.csv")
        write_atomic(work / "sweep.svg", plot)
    print(f"wrote {out / 'sweep.csv'} ({len(rows)} rows) and {out / 'sweep.svg'}")
    return 0
