"""`moescope prune MODEL_DIR --plan prune.json --method remove --out DIR`: write a pruned checkpoint from a
plan, then replay calibration prompts through it to prove the pruned experts are no longer chosen (for
`remove`: that the pruned model routes exactly as the original with the same experts masked, where the
router family makes the two equal).

Methods (docs/pruning.md): remove (structural), mask (a router bias), zero, soft, and the seeds'
row-1e9, kept for comparison because it does not prune.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moescope.backends.hf.loading import load_model, model_identity
from moescope.calibration import CALIBRATION
from moescope.compress.prune import METHODS, check_pruned, prune_checkpoint, replay_batches
from moescope.errors import MoescopeError
from moescope.models.registry import find_moe_layers
from moescope.plans import PrunePlan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint to prune (never modified)")
    parser.add_argument("--plan", required=True, help="prune plan from `moescope plan prune`")
    parser.add_argument("--method", choices=METHODS, default="remove",
                        help="remove (structural), mask (router bias), zero, soft, or row-1e9 (the seeds' flawed "
                             "method, for comparison)")
    parser.add_argument("--offset", type=float, default=2.0, help="logit offset for --method soft")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--calibration", default=str(CALIBRATION),
                        help="prompts for the replay check (default: the embedded calibration set)")
    parser.add_argument("--replay-prompts", type=int, default=32, help="prompts replayed (0: skip the replay)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per replayed prompt")


def run(args: argparse.Namespace) -> int:
    plan = PrunePlan.load(args.plan)
    if args.replay_prompts > 0 and not Path(args.calibration).is_file():
        raise MoescopeError(f"replay set {args.calibration} not found: pass --calibration FILE or --replay-prompts 0")
    model = load_model(args.model_dir)
    layers = find_moe_layers(model)
    plan.check(model_identity(model), {x.index: x.num_experts for x in layers}, min(x.top_k for x in layers))
    batches = replay_batches(args.model_dir, args.calibration, args.replay_prompts, args.max_tokens) \
        if args.replay_prompts > 0 else []
    out = prune_checkpoint(args.model_dir, args.out, plan, args.method, args.offset)
    console = Console()
    console.print(f"wrote {out} ({args.method}, {sum(len(v) for v in plan.prune.values())} experts)")
    if args.replay_prompts <= 0:
        return 0
    check = check_pruned(model, load_model(out), batches, plan, args.method)
    what = "differs from a -inf mask" if args.method == "remove" else "after"
    table = Table(title=f"replay of {args.replay_prompts} prompts: selections of pruned experts")
    for column in ("layer", "pruned experts", "before", what):
        table.add_column(column, justify="right")
    for layer, experts in sorted(plan.prune.items()):
        total = check.before.selections.get(layer, 0) or 1
        hits = check.after.pruned_selections.get(layer, 0)
        after = f"{check.remove_vs_mask[layer]:.2%} of tokens" if args.method == "remove" else \
            f"{hits} ({hits / total:.2%})"
        table.add_row(str(layer), str(len(experts)), f"{check.before.pruned_selections[layer] / total:.2%}", after)
    console.print(table)
    if args.method == "remove" and not check.exact:
        console.print("this router family does not make removal equal to a mask (e.g. group-limited routing): "
                      "the difference is shown, not checked")
    failure = check.failure()
    if failure:
        raise MoescopeError(f"{failure}: please report this")
    return 0
