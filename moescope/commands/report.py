"""`moescope report PROFILE --out report.html`: a self-contained HTML report of a profile (plots, tiers, summary)."""

from __future__ import annotations

import argparse

from moescope.analysis.accuracy import load_accuracy
from moescope.analysis.analyse import analyse
from moescope.commands.common import add_overwrite_argument, add_stats_arguments, stats_options
from moescope.output import FILE
from moescope.profiling.store import Profile
from moescope.report.page import write_report

OUTPUTS = {"out": FILE}
INPUTS = ("profile", "accuracy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stats_arguments(parser)
    parser.add_argument("--out", required=True, help="HTML file to write")
    parser.add_argument("--accuracy", metavar="FILE", help="add per-expert accuracy from `moescope accuracy`")
    add_overwrite_argument(parser, "--out")


def run(args: argparse.Namespace) -> int:
    profile = Profile.load(args.profile)
    accuracy = load_accuracy(args.accuracy, profile.model) if args.accuracy else None
    write_report(profile, analyse(profile, stats_options(args)), args.out, accuracy)
    print(f"wrote {args.out}")
    return 0
