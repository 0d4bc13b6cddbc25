"""`moescope merge P1 P2 ... --out P`: add profiles of the same model, e.g. shards run on different
machines. Counters are added; per-prompt data (presence, token and selection counts) is concatenated,
so the merge equals one run over all the prompts. Profiles of different models, settings or counter
sets are refused, naming the difference."""

from __future__ import annotations

import argparse
import os
import shutil
from functools import reduce
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.stats import Profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profiles", nargs="+", metavar="PROFILE_DIR", help="profiles to add together")
    parser.add_argument("--out", required=True, metavar="PROFILE_DIR", help="directory to write the sum to")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def merge_profiles(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> Profile:
    """Load, add and save; written to `out.partial` and renamed, so a failure leaves no profile."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MoescopeError(f"{out} already exists; pass --overwrite to replace it")
    if len(paths) < 2:
        raise MoescopeError("give at least two profiles to merge")
    merged = reduce(Profile.merge, (Profile.load(p) for p in paths))
    merged.check()
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    merged.save(work)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return merged


def run(args: argparse.Namespace) -> int:
    merged = merge_profiles(args.profiles, args.out, args.overwrite)
    print(f"merged {len(args.profiles)} profiles ({len(merged.prompts)} prompts) into {args.out}")
    return 0
