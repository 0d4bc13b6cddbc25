"""`moescope plan prune PROFILE ...`: choose experts to prune from a profile, and write a plan.

Criteria give each expert an importance score; the least important go first (moescope.analysis.criteria):
{criteria}
- ablation: measured, the loss increase on calibration text when that expert alone is masked.

Budgets: `--ratio R` prunes round(R x E) experts in every layer; `--layer-ratios 0:0.1,3:0.3` sets
them per layer (layers not named use --ratio, or 0); `--threshold T` prunes experts whose score is
below T times their layer's mean score. `--protect-domain D` keeps every expert that receives at
least twice its fair share (2/E) of domain D's selections in a layer.

`moescope plan merge PROFILE --ratio R --method hc-smoe|m-smoe --out merge.json` groups experts to fold
into one (moescope.analysis.merging); see `moescope plan merge --help`.

`moescope plan tiers PROFILE --out bits.json` sorts experts into critical / standard / deprioritised /
prune tiers by their load relative to the fair share 1/E (see moescope.analysis.tiers) and writes the bit plan
(8 / 4 / 2 / 0 bits by default) that `moescope quantize --plan` reads; `--prune-out` also writes the
prune tier as a prune plan.
"""

from __future__ import annotations

import argparse

from moescope.analysis import merging as merging_module
from moescope.analysis import tiers as tiers_module
from moescope.analysis.criteria import CRITERIA
from moescope.analysis.merging import MERGE_METHODS, USAGE, check_merge_ratio, make_merge_plan
from moescope.analysis.selection import make_prune_plan
from moescope.analysis.tiers import TIERS, tier_bit_plan
from moescope.backends.hf.loading import load_model, load_tokenizer, model_identity
from moescope.calibration import CALIBRATION
from moescope.commands.common import POSITIVE_INT, add_overwrite_argument, add_tier_arguments, bounded, tier_options
from moescope.compress import merge as merge_module
from moescope.compress.merge import SIMILARITIES, expert_similarity
from moescope.compress.routing import calibration_batch, capture_router_io
from moescope.errors import MoescopeError
from moescope.judge.ablation import measured_ablation
from moescope.output import FILE
from moescope.plans import PrunePlan, save_bit_plan
from moescope.profiling.store import Profile

OUTPUTS = {"out": FILE, "prune_out": FILE}
INPUTS = ("profile", "model", "calibration")

__doc__ = __doc__.format(criteria="\n".join(f"- {c.name}: {c.description}" for c in CRITERIA.values()))
tiers_doc = tiers_module.__doc__


def parse_layer_ratios(text: str | None) -> dict[int, float]:
    if not text:
        return {}
    try:
        return {int(layer): float(ratio) for layer, ratio in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise MoescopeError(f"--layer-ratios {text!r}: write LAYER:RATIO pairs, e.g. 0:0.1,3:0.25") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_kind", metavar="KIND", required=True)
    prune = sub.add_parser("prune", help="choose experts to prune", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("profile", metavar="PROFILE", help="profile directory from `moescope profile`")
    prune.add_argument("--criterion", choices=(*CRITERIA, "ablation"), default="gate-mass",
                       help="what ranks experts (default gate-mass); ablation: measured on --calibration")
    prune.add_argument("--ratio", type=float, help="share of experts to prune in every layer, e.g. 0.1")
    prune.add_argument("--layer-ratios", help="per-layer shares, LAYER:RATIO,... (others use --ratio)")
    prune.add_argument("--threshold", type=float, help="prune experts scoring below T x their layer's mean")
    prune.add_argument("--protect-domain", action="append", default=[], metavar="D",
                       help="keep experts domain D depends on (repeatable)")
    prune.add_argument("--model", help="checkpoint for --criterion ablation (default: the profile's model)")
    prune.add_argument("--calibration", help="JSONL text for --criterion ablation")
    prune.add_argument("--ablation-windows", type=POSITIVE_INT, default=8, help="windows of text per ablation (budget)")
    prune.add_argument("--ablation-length", type=bounded(int, 2), default=128, help="tokens per window (at least 2)")
    prune.add_argument("--out", required=True, help="plan JSON to write")
    add_overwrite_argument(prune, "--out")

    add_merge_arguments(sub)
    tiers = sub.add_parser("tiers", help="sort experts into tiers and write their bit plan", description=tiers_doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    tiers.add_argument("profile", metavar="PROFILE", help="profile directory from `moescope profile`")
    add_tier_arguments(tiers)
    tiers.add_argument("--out", required=True, help="bit plan JSON to write")
    tiers.add_argument("--prune-out", help="also write the prune tier as a prune plan JSON for `moescope prune`")
    add_overwrite_argument(tiers, "--out and --prune-out")


def add_merge_arguments(sub) -> None:
    merge = sub.add_parser("merge", help="group experts to fold into one (HC-SMoE, M-SMoE)",
                           description=f"{merging_module.__doc__}\n{merge_module.__doc__}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("profile", metavar="PROFILE", help="profile directory from `moescope profile` (usage counts)")
    merge.add_argument("--ratio", type=float, required=True, help="share of experts to merge away per layer, e.g. 0.25")
    merge.add_argument("--method", choices=MERGE_METHODS, default="hc-smoe",
                       help="hc-smoe: average-linkage clustering; m-smoe: most used experts lead (default hc-smoe)")
    merge.add_argument("--similarity", choices=SIMILARITIES, default="outputs",
                       help="what makes experts alike, measured on --calibration (default outputs)")
    merge.add_argument("--usage", choices=USAGE, default="frequency",
                       help="profile counter that weighs each member of a group (default frequency)")
    merge.add_argument("--model", help="checkpoint to measure similarity on (default: the profile's model)")
    merge.add_argument("--calibration", default=str(CALIBRATION),
                       help="JSONL prompts to measure similarity on (default: the embedded calibration set)")
    merge.add_argument("--prompts", type=int, default=128, help="prompts spread over --calibration (default 128)")
    merge.add_argument("--max-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    merge.add_argument("--out", required=True, help="merge plan JSON to write")
    add_overwrite_argument(merge, "--out")


def run_merge(args: argparse.Namespace) -> int:
    profile = Profile.load(args.profile)
    check_merge_ratio(profile, args.ratio)
    model_dir = args.model or profile.model.source
    if not model_dir:
        raise MoescopeError("the profile does not record where its model is: pass --model DIR")
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    profile.model.require(model_identity(model), "profile")
    batch = calibration_batch(tokenizer, args.calibration, args.prompts, args.max_tokens)
    similarity = expert_similarity(model, capture_router_io(model, batch), args.similarity)
    tokens = int(batch[1].sum())
    plan = make_merge_plan(profile, similarity, args.method, args.ratio, usage=args.usage, source={
        "profile": str(args.profile), "similarity": args.similarity, "calibration": str(args.calibration),
        "calibration_prompts": int(batch[0].shape[0]), "similarity_tokens": tokens, "model": str(model_dir)})
    plan.save(args.out)
    before, after = sum(plan.num_experts.values()), sum(plan.merged_count(layer) for layer in plan.num_experts)
    largest = max(len(g) for groups in plan.groups.values() for g in groups)
    print(f"{args.out}: {before} experts into {after} ({1 - after / before:.1%} fewer), method {args.method}, "
          f"similarity of {args.similarity} on {tokens} calibration tokens; largest group {largest}")
    return 0


def run_tiers(args: argparse.Namespace) -> int:
    profile = Profile.load(args.profile)
    plan, prune = tier_bit_plan(profile, tier_options(args), str(args.profile))
    save_bit_plan(plan, args.out)
    bits = plan.source["tier_bits"]
    totals = {t: sum(layer[t] for layer in plan.source["tiers"].values()) for t in TIERS}
    print(f"{args.out}: " + ", ".join(f"{n} {t} ({bits[t]} bits)" for t, n in totals.items()))
    if args.prune_out:
        PrunePlan(model=plan.model, num_experts={x["layer"]: x["num_experts"] for x in profile.layers},
                  top_k=min(x["top_k"] for x in profile.layers), prune=prune, criterion=f"tiers:{args.criterion}",
                  source=plan.source).save(args.prune_out)
        print(f"{args.prune_out}: {sum(map(len, prune.values()))} prune-tier experts")
    elif any(prune.values()):
        print("prune-tier experts are written at the lowest bits; pass --prune-out to write them as a prune plan")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.plan_kind == "tiers":
        return run_tiers(args)
    if args.plan_kind == "merge":
        return run_merge(args)
    profile = Profile.load(args.profile)
    scores = None
    if args.criterion == "ablation":
        model_dir = args.model or profile.model.source
        if not model_dir or not args.calibration:
            raise MoescopeError("--criterion ablation needs --calibration FILE (and --model DIR if the profile "
                                "does not record where its model is)")
        scores = measured_ablation(profile, model_dir, args.calibration, args.ablation_windows, args.ablation_length)
    plan = make_prune_plan(profile, args.criterion, ratio=args.ratio,
                           layer_ratios=parse_layer_ratios(args.layer_ratios), threshold=args.threshold,
                           protect_domains=tuple(args.protect_domain), scores=scores, profile_path=str(args.profile))
    plan.save(args.out)
    pruned = sum(len(v) for v in plan.prune.values())
    total = sum(plan.num_experts.values())
    print(f"{args.out}: {pruned} of {total} experts to prune ({pruned / total:.1%}), criterion {args.criterion}")
    return 0
