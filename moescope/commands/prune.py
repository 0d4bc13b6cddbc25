"""`moescope prune MODEL_DIR --plan plan.json --method remove --out DIR`: write a pruned checkpoint from a
plan, then replay calibration prompts through it to prove the pruned experts are no longer chosen (for
`remove`: that the pruned model routes exactly as the original with the same experts masked, where the
router family makes the two equal).

Methods (docs/pruning.md): remove (structural), mask (a router bias), zero, soft, the seeds' row-1e9,
kept for comparison because it does not prune, and merge, which folds each group of a merge plan
(`moescope plan merge`) into one expert and fits its router row on calibration tokens. `--backend mlx`
replays under mlx-lm, and mlx-lm's converted layout (quantised or not) takes remove and mask.

`--repair-router` then refits only the router weights so the model routes as the original did on
`--calibration` (moescope.compress.repair), and reports routing agreement before and after on the
half of the calibration prompts it was not fitted on. Every other tensor is written back unchanged.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moescope.backends.hf.loading import Placement, load_model, load_tokenizer, model_identity
from moescope.backends.select import is_mlx_model, model_layers, open_model
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
from moescope.compress.merge import ROUTER_RULES, fit_routers
from moescope.compress.prune import METHODS, check_method, check_pruned, prune_checkpoint, replay, replay_batches
from moescope.compress.repair import REPAIR_STEPS, repair_checkpoint, repair_routers
from moescope.compress.routing import (
    calibration_batch,
    capture_router_io,
    expert_targets,
    halves,
    mean_over_layers,
    routing_agreement,
)
from moescope.errors import MoescopeError
from moescope.plans import MergePlan, load_plan

OUTPUTS = {"out": CHECKPOINT}
INPUTS = ("model_dir", "plan", "calibration")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint to prune (never modified)")
    parser.add_argument("--plan", required=True, help="prune plan (`moescope plan prune`) or merge plan "
                        "(`moescope plan merge`)")
    parser.add_argument("--method", choices=METHODS, default="remove",
                        help="remove (structural), mask (router bias), zero, soft, row-1e9 (the seeds' flawed "
                             "method, for comparison) or merge (a merge plan)")
    parser.add_argument("--offset", type=FINITE, default=2.0, help="logit offset for --method soft")
    parser.add_argument("--merge-router", choices=ROUTER_RULES, default="fit",
                        help="router rows of merged experts: fit (least squares to the group's log-sum-exp, the "
                             "default) or mean (usage-weighted mean of the members' rows)")
    parser.add_argument("--no-align", action="store_true",
                        help="merge without first permuting each member's neurons to match its group's first expert")
    parser.add_argument("--repair-router", action="store_true",
                        help="refit the router weights to the original's routing on --calibration (required)")
    parser.add_argument("--repair-steps", type=POSITIVE_INT, default=REPAIR_STEPS,
                        help=f"L-BFGS steps per router (default {REPAIR_STEPS})")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    add_overwrite_argument(parser, "--out")
    parser.add_argument("--calibration", help="JSONL prompts: routing is matched on them (merge, --repair-router) and "
                        "replayed (default for the replay and for merge: the plan's set or the embedded one)")
    parser.add_argument("--fit-prompts", type=POSITIVE_INT, default=128,
                        help="prompts spread over --calibration for merging and repair; even ones fit, odd ones check")
    parser.add_argument("--replay-prompts", type=NONNEGATIVE_INT, default=32,
                        help="prompts replayed (0: skip the replay)")
    parser.add_argument("--max-tokens", type=POSITIVE_INT, default=128, help="tokens per prompt")
    add_placement_arguments(parser)
    add_backend_argument(parser, what="the replays")


def model_placement(model) -> Placement:
    """Where a loaded model runs: to load its compressed copy the same way."""
    return Placement(dtype=str(model.dtype).removeprefix("torch."))


def routing_set(args: argparse.Namespace, plan) -> str | None:
    """The calibration prompts routing is matched on, or None when nothing is matched; refuses what is missing."""
    if args.repair_router and not args.calibration:
        raise MoescopeError("--repair-router needs --calibration FILE: the prompts on which the refitted routers must "
                            "route as the original's did")
    if args.method != "merge" and not args.repair_router:
        return None
    chosen = args.calibration or plan.source.get("calibration") or str(CALIBRATION)
    if not Path(chosen).is_file():
        raise MoescopeError(f"calibration set {chosen} not found: pass --calibration FILE")
    return chosen


def agreement_table(title: str, reports: dict[str, dict[int, dict]]) -> Table:
    """Per layer, agreement and divergence of each named report."""
    table = Table(title=title)
    table.add_column("layer", justify="right")
    for name in reports:
        table.add_column(f"{name}: agreement", justify="right")
        table.add_column(f"{name}: divergence", justify="right")
    for layer in next(iter(reports.values())):
        cells = [f"{r[layer][key]:.3f}" if key == "divergence" else f"{r[layer][key]:.1%}"
                 for r in reports.values() for key in ("agreement", "divergence")]
        table.add_row(str(layer), *cells)
    return table


def write_candidate(args, model, plan, out: Path, captured: dict | None, console: Console) -> Path:
    """The pruned or merged checkpoint (merged router rows fitted on the `captured` fit prompts, and both
    rules reported)."""
    routers = None
    if args.method == "merge":
        routers = fit_routers(model, captured, plan)
        console.print(agreement_table("merged router rows, measured layer by layer on the fit prompts",
                                      {rule: {layer: r.report[rule] for layer, r in routers.items()}
                                       for rule in ROUTER_RULES}))
    final = out == Path(args.out)  # not a staging directory: --overwrite applies
    return prune_checkpoint(args.model_dir, out, plan, args.method, args.offset, final and args.overwrite,
                            routers=routers, router_rule=args.merge_router, align=not args.no_align)


def repair(args, model, plan, batch, console: Console) -> None:
    """Write the candidate to a staging directory, refit its routers, write the result to --out."""
    fit_batch, check_batch = halves(batch)
    targets = expert_targets(plan, args.method)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".stage", dir=out.parent) as stage:
        original_fit, original_check = capture_router_io(model, fit_batch), capture_router_io(model, check_batch)
        staged = write_candidate(args, model, plan, Path(stage) / "model", original_fit, console)
        candidate = load_model(staged, model_placement(model))
        before = routing_agreement(candidate, original_check, capture_router_io(candidate, check_batch), targets)
        fitted = repair_routers(candidate, original_fit, fit_batch, targets, args.repair_steps)
        after = routing_agreement(candidate, original_check, capture_router_io(candidate, check_batch), targets)
        report = {"steps": args.repair_steps, "calibration": str(args.calibration), "fit": fitted,
                  "check_before": before, "check_after": after}
        repair_checkpoint(staged, out, candidate, report, args.overwrite)
    console.print(agreement_table("routing agreement with the original on the check prompts",
                                  {"before repair": before, "after repair": after}))
    console.print(f"router repair: agreement {mean_over_layers(before, 'agreement'):.1%} -> "
                  f"{mean_over_layers(after, 'agreement'):.1%}, divergence {mean_over_layers(before, 'divergence'):.4f}"
                  f" -> {mean_over_layers(after, 'divergence'):.4f} (mean over layers)")


def run(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    check_method(plan, args.method)
    matched_on = routing_set(args, plan)
    replay_set = args.calibration or str(CALIBRATION)
    if args.replay_prompts > 0 and not Path(replay_set).is_file():
        raise MoescopeError(f"replay set {replay_set} not found: pass --calibration FILE or --replay-prompts 0")
    model = open_model(args.model_dir, args.backend, placement_from_args(args))
    if matched_on and is_mlx_model(model):
        raise MoescopeError("merging and --repair-router fit routers with transformers: use --backend hf")
    layers = model_layers(model)
    plan.check(model_identity(model), {x.index: x.num_experts for x in layers}, min(x.top_k for x in layers))
    batch = calibration_batch(load_tokenizer(args.model_dir), matched_on, args.fit_prompts, args.max_tokens) \
        if matched_on else None
    replays = replay_batches(args.model_dir, replay_set, args.replay_prompts, args.max_tokens) \
        if args.replay_prompts > 0 else None  # read (and checked) before anything is written
    console = Console()
    if args.repair_router:
        repair(args, model, plan, batch, console)
    else:
        captured = capture_router_io(model, halves(batch)[0]) if batch else None
        write_candidate(args, model, plan, Path(args.out), captured, console)
    console.print(f"wrote {args.out} ({args.method}, {plan.experts_fewer()} experts fewer or pruned)")
    if replays is not None:
        replay_check(args, model, plan, replays, console)
    return 0


def replay_check(args, model, plan, batches, console: Console) -> None:
    """Replay prompts through the written checkpoint: it must load with the plan's expert count, and no
    masked or removed expert may be chosen."""
    written = open_model(args.out, args.backend, placement_from_args(args))
    if isinstance(plan, MergePlan):
        counts = {layer.index: layer.num_experts for layer in model_layers(written)}
        expected = {layer: plan.merged_count(layer) for layer in plan.num_experts}
        if counts != expected:
            raise MoescopeError(f"the merged checkpoint has {counts} experts per layer, the plan {expected}: please "
                                "report this")
        after = replay(written, batches, {})
        console.print(f"replay of {args.replay_prompts} prompts: the merged model loads with {expected} experts per "
                      f"layer and routed {after.tokens} tokens")
        return
    check = check_pruned(model, written, batches, plan, args.method, refitted=args.repair_router)
    what = "differs from a -inf mask" if args.method == "remove" else "after"
    table = Table(title=f"replay of {args.replay_prompts} prompts: selections of pruned experts")
    for column in ("layer", "pruned experts", "before", what):
        table.add_column(column, justify="right")
    for layer, experts in sorted(plan.prune.items()):
        total = check.before.selections.get(layer, 0) or 1
        hits = check.after.pruned_selections.get(layer, 0)
        if args.method != "remove":
            after = f"{hits} ({hits / total:.2%})"
        else:
            after = "removed" if check.remove_vs_mask is None else f"{check.remove_vs_mask[layer]:.2%} of tokens"
        table.add_row(str(layer), str(len(experts)), f"{check.before.pruned_selections[layer] / total:.2%}", after)
    console.print(table)
    if args.method == "remove" and check.remove_vs_mask is None:
        console.print("under mlx-lm the removal is not compared with a mask: replay with --backend hf for that check")
    elif args.method == "remove" and args.repair_router:
        console.print("the routers were refitted (--repair-router), so they may route unlike the masked original: "
                      "the difference is shown, not checked")
    elif args.method == "remove" and not check.exact:
        console.print("this router family does not make removal equal to a mask (e.g. group-limited routing): "
                      "the difference is shown, not checked")
    failure = check.failure()
    if failure:
        raise MoescopeError(f"{failure}: please report this")
