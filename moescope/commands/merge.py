"""`moescope merge P1 P2 ... --out P`: add profiles of the same model, e.g. shards run on different machines."""

from __future__ import annotations

import argparse

from moescope.commands.common import add_overwrite_argument
from moescope.profiling.merge import merge_profiles
from moescope.profiling.store import PROFILE

OUTPUTS = {"out": PROFILE}
INPUTS = ("profiles",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profiles", nargs="+", metavar="PROFILE_DIR", help="profiles to add together")
    parser.add_argument("--out", required=True, metavar="PROFILE_DIR", help="directory to write the sum to")
    add_overwrite_argument(parser, "--out")


def run(args: argparse.Namespace) -> int:
    merged = merge_profiles(args.profiles, args.out, args.overwrite)
    print(f"merged {len(args.profiles)} profiles ({len(merged.prompts)} prompts) into {args.out}")
    return 0
