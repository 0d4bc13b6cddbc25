"""`moescope stats PROFILE [--json]`: routing metrics per layer and for the model, with error bars.

Columns (formulas in docs/metrics.md): dead = experts never chosen; near = chosen, but below
--near-dead x the fair share 1/E; touched = mean share of the layer's experts one prompt touches
(95 % bootstrap interval over prompts); H/lnE = entropy ratio (1 = even); Gini; top = share of the
top 10 % of experts as a multiple of their fair share (these three with a 95 % bootstrap interval over
prompts [lo, hi] when the profile kept per-prompt counts); weight P50/P95/P99 of the routing weights;
Hk/lnk = mean entropy of a token's top-k weights over its maximum; unseen = experts used but not yet
seen (Chao2, 95 % interval; `--json` also gives `unused` = dead - unseen, the experts truly unused, with
its interval); need = prompts expected to reveal --coverage of the live experts; dom / lang = the
most domain- / language-specific expert (Jensen-Shannon divergence, bits) and the group it favours;
tiers = critical / standard / deprioritised / prune counts.
"""

from __future__ import annotations

import argparse
import json

from moescope.analysis.analyse import analyse
from moescope.commands.common import add_stats_arguments, stats_options
from moescope.profiling.store import Profile
from moescope.report.text import print_tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_stats_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print every figure as JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    analysis = analyse(Profile.load(args.profile), stats_options(args))
    if args.json:
        print(json.dumps(analysis.to_json(), indent=1))
    else:
        print_tables(analysis)
    return 0
