"""`moescope prune MODEL_DIR --plan prune.json --method remove --out DIR`: write a pruned checkpoint from a
plan, then replay calibration prompts through it to prove the pruned experts are no longer chosen.

Methods (docs/pruning.md): remove (structural), mask (a router bias), zero, soft, and the seeds'
row-1e9, kept for comparison because it does not prune. `--backend mlx` replays under mlx-lm, and
mlx-lm's converted layout (quantised or not) takes remove and mask.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moescope.backends.hf.loading import model_identity
from moescope.backends.select import model_layers, open_model
from moescope.calibration import CALIBRATION
from moescope.commands.common import (
    FINITE,
    NONNEGATIVE_INT,
    POSITIVE_INT,
    add_backend_argument,
    add_overwrite_argument,
    add_placement_arguments,
    placement_from_args,
)
from moescope.compress.checkpoint import CHECKPOINT
from moescope.compress.prune import METHODS, prune_checkpoint, replay, replay_batches
from moescope.errors import MoescopeError
from moescope.plans import PrunePlan

OUTPUTS = {"out": CHECKPOINT}
INPUTS = ("model_dir", "plan", "calibration")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint to prune (never modified)")
    parser.add_argument("--plan", required=True, help="prune plan from `moescope plan prune`")
    parser.add_argument("--method", choices=METHODS, default="remove",
                        help="remove (structural), mask (router bias), zero, soft, or row-1e9 (the seeds' flawed "
                             "method, for comparison)")
    parser.add_argument("--offset", type=FINITE, default=2.0, help="logit offset for --method soft")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    add_overwrite_argument(parser, "--out")
    parser.add_argument("--calibration", default=str(CALIBRATION),
                        help="prompts for the replay check (default: the embedded calibration set)")
    parser.add_argument("--replay-prompts", type=NONNEGATIVE_INT, default=32,
                        help="prompts replayed (0: skip the replay)")
    parser.add_argument("--max-tokens", type=POSITIVE_INT, default=128, help="tokens per replayed prompt")
    add_placement_arguments(parser)
    add_backend_argument(parser, what="the replays")


def run(args: argparse.Namespace) -> int:
    plan = PrunePlan.load(args.plan)
    placement = placement_from_args(args)
    if args.replay_prompts > 0 and not Path(args.calibration).is_file():
        raise MoescopeError(f"replay set {args.calibration} not found: pass --calibration FILE or --replay-prompts 0")
    model = open_model(args.model_dir, args.backend, placement)
    layers = model_layers(model)
    plan.check(model_identity(model), {x.index: x.num_experts for x in layers}, min(x.top_k for x in layers))
    batches = replay_batches(args.model_dir, args.calibration, args.replay_prompts, args.max_tokens) \
        if args.replay_prompts > 0 else []
    out = prune_checkpoint(args.model_dir, args.out, plan, args.method, args.offset, args.overwrite)
    console = Console()
    console.print(f"wrote {out} ({args.method}, {sum(len(v) for v in plan.prune.values())} experts)")
    if args.replay_prompts <= 0:
        return 0
    before = replay(model, batches, plan.prune)
    pruned_model = open_model(out, args.backend, placement)
    after = replay(pruned_model, batches, {} if args.method == "remove" else plan.prune)
    table = Table(title=f"replay of {args.replay_prompts} prompts: selections of pruned experts")
    for column in ("layer", "pruned experts", "before", "after"):
        table.add_column(column, justify="right")
    for layer, experts in sorted(plan.prune.items()):
        total = after.selections.get(layer, 0) or 1
        hits = after.pruned_selections.get(layer, 0)
        table.add_row(str(layer), str(len(experts)), f"{before.pruned_selections[layer] / total:.2%}",
                      "removed" if args.method == "remove" else f"{hits} ({hits / total:.2%})")
    console.print(table)
    if args.method in ("mask", "remove") and after.pruned_total:
        raise MoescopeError(f"replay found {after.pruned_total} selections of masked experts: please report this")
    return 0
