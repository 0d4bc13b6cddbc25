"""Add profiles of the same model, e.g. shards run on different machines.

Counters are added; per-prompt data (presence, token and selection counts) is concatenated, so the
merge equals one run over all the prompts. Profiles of different models, settings or counter sets
are refused, naming the difference."""

from __future__ import annotations

from functools import reduce
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.output import atomic_directory
from moescope.profiling.store import PROFILE, Profile


def merge_profiles(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> Profile:
    """Load, add and save into `out` (built under a temporary name, so a failure leaves no profile)."""
    if len(paths) < 2:
        raise MoescopeError("give at least two profiles to merge")
    with atomic_directory(out, PROFILE, overwrite, sources=paths) as work:
        merged = reduce(Profile.merge, (Profile.load(p) for p in paths))
        merged.check()
        merged.save(work)
    return merged
