"""`moescope report PROFILE --out report.html`: a self-contained HTML report of a profile (plots, tiers, summary)."""

from __future__ import annotations

import argparse

from moescope.analysis.accuracy import load_accuracy
from moescope.analysis.analyse import analyse
from moescope.commands.common import add_stats_arguments, stats_options
from moescope.profiling.store import Profile
from moescope.report.page import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stats_arguments(parser)
    parser.add_argument("--out", required=True, help="HTML file to write")
    parser.add_argument("--accuracy", metavar="FILE", help="add per-expert accuracy from `moescope accuracy`")


def run(args: argparse.Namespace) -> int:
    accuracy = load_accuracy(args.accuracy) if args.accuracy else None
    profile = Profile.load(args.profile)
    write_report(profile, analyse(profile, stats_options(args)), args.out, accuracy)
    print(f"wrote {args.out}")
    return 0
