"""`moescope sweep prune|quant`: perplexity per domain against how much is compressed, per method.

`sweep prune`: against the share of experts pruned, per criterion.

The seeds pruned in stages by frequency only; this sweep puts every criterion side by side on the
same held-out data, so "frequency is a poor proxy for importance" becomes a measured statement.
Each (criterion, ratio) point builds a plan from the profile, applies it with the chosen method
(`remove`, `zero` and `row-1e9` through a real rewritten checkpoint in a temporary directory;
`mask` and `soft` as run-time logit offsets, which is what their checkpoint biases do) and
evaluates it with the fixed perplexity protocol of `moescope evaluate`.

`sweep quant`: against average bits per expert weight, for three plans at each target: uniform
(every expert at the target, where it is a supported width), tiered (experts ranked by importance
alone, the top share at the width above the target and the rest at the width below, in the shares
that make the average; the seeds' tiers with the tier sizes set by the budget) and budget-allocated
(importance x measured distortion, `moescope quantize --budget`; with `--importance fisher` the
Fisher-weighted weight error alone, and tiers ranked by it). A target between widths has no uniform
plan; a width (2, 3, 4, 8) has tiers strictly around it (e.g. 3 and 8 for 4 bits). Each row gives
the plan's actual average. Plans are applied to one model in memory, whose weights are restored
between plans.
"""

from __future__ import annotations

import argparse
import csv
import io
import tempfile
from contextlib import nullcontext
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.output import write_atomic

CHECKPOINT_METHODS = ("remove", "zero", "row-1e9")


def parse_list(text: str, kind=str) -> list:
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise MoescopeError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None


def sweep_prune(model_dir: str, profile_dir: str, ratios: list[float], criteria: list[str], method: str,
                data: str, protocol, calibration: str | None = None, offset: float = 2.0) -> list[dict]:
    """One row per (criterion, ratio, domain, lang): perplexity and its ratio to the unpruned model."""
    from tqdm import tqdm

    from moescope.evaluate import group_perplexities, load_windows
    from moescope.loading import load_model, load_tokenizer
    from moescope.plan import make_prune_plan, measured_ablation
    from moescope.prune import offsets_for, prune_checkpoint, routing_offsets
    from moescope.stats import Profile

    profile = Profile.load(profile_dir)
    base, tokenizer = load_model(model_dir, dtype=protocol.dtype), load_tokenizer(model_dir)
    windows = load_windows(data, tokenizer, protocol, base)
    baseline = group_perplexities(base, windows, protocol.batch_size)
    ablation = None
    if "ablation" in criteria:
        if not calibration:
            raise MoescopeError("--criteria ablation needs --calibration FILE to measure losses on")
        ablation = measured_ablation(profile, model_dir, calibration, windows=8, length=128)
    rows = [{"criterion": "none", "ratio": 0.0, "method": method, "experts_pruned": 0, "domain": d, "lang": g,
             "perplexity": p, "vs_baseline": 1.0} for (d, g), p in baseline.items()]
    points = [(c, r) for c in criteria for r in ratios]
    for criterion, ratio in tqdm(points, desc=f"sweep ({method})", unit="plan"):
        plan = make_prune_plan(profile, criterion, ratio=ratio, scores=ablation if criterion == "ablation" else None,
                               profile_path=profile_dir)
        if method in CHECKPOINT_METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                out = prune_checkpoint(model_dir, Path(tmp) / "pruned", plan, method, offset)
                result = group_perplexities(load_model(out, dtype=protocol.dtype), windows, protocol.batch_size)
        else:
            value = float("-inf") if method == "mask" else -offset
            with routing_offsets(base, offsets_for(plan, value)) if plan.prune else nullcontext():
                result = group_perplexities(base, windows, protocol.batch_size)
        pruned = sum(len(v) for v in plan.prune.values())
        rows += [{"criterion": criterion, "ratio": ratio, "method": method, "experts_pruned": pruned, "domain": d,
                  "lang": g, "perplexity": p, "vs_baseline": p / baseline[(d, g)]} for (d, g), p in result.items()]
    return rows


def tiered_plan(model, importance, avg_bits: float, options):
    """Two tiers by importance around `avg_bits`: the most important experts at the next supported
    width above it (strictly above when it is a width), the rest at the width below, the top tier as
    large as the average allows."""
    import numpy as np

    from moescope.quantize import SUPPORTED_BITS, BitPlan, model_info

    lower = [w for w in SUPPORTED_BITS if w < avg_bits]
    upper = [w for w in SUPPORTED_BITS if w > avg_bits]
    if not lower or not upper:
        raise MoescopeError(f"tiers need a width below and above {avg_bits:g} bits (widths {SUPPORTED_BITS})")
    low, high = lower[-1], upper[0]
    flat = np.asarray(importance, dtype=np.float64).ravel()
    top = int((avg_bits - low) / (high - low) * flat.size + 1e-9)
    bits = np.full(flat.size, low)
    bits[np.argsort(-flat, kind="stable")[:top]] = high
    bits = bits.reshape(np.shape(importance))
    layers = {index: [int(b) for b in row] for index, row in zip(sorted(model_layers(model)), bits, strict=True)}
    return BitPlan.made_with(options, layers, model_info(model), "tiers",
                             {"tiers": {str(high): top, str(low): flat.size - top}, "target_bits": avg_bits})


def model_layers(model) -> list[int]:
    from moescope.models import find_moe_layers

    return [layer.index for layer in find_moe_layers(model)]


def sweep_quant(model_dir: str, profile_dir: str | None, targets: list[float], data: str, protocol,
                importance_kind: str = "gate-energy", calibration: str | None = None,
                scales: str = "minmax", symmetric: bool = True) -> list[dict]:
    """One row per (plan, target bits, domain, lang): perplexity and its ratio to the original."""
    from tqdm import tqdm

    from moescope.evaluate import group_perplexities, load_windows
    from moescope.loading import load_model, load_tokenizer
    from moescope.quantize import (
        SUPPORTED_BITS,
        QuantOptions,
        allocation_inputs,
        apply_bit_plan,
        budget_plan,
        memory_estimate,
        uniform_plan,
    )

    for target in targets:
        if not SUPPORTED_BITS[0] <= target <= SUPPORTED_BITS[-1]:
            raise MoescopeError(f"--bits {target:g} is outside {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}")
    model, tokenizer = load_model(model_dir, dtype=protocol.dtype), load_tokenizer(model_dir)
    options = QuantOptions(symmetric=symmetric, scales=scales)
    importance, distortion, _ = allocation_inputs(model, importance_kind, profile_dir, SUPPORTED_BITS, options,
                                                  calibration, tokenizer)
    # Tiers rank experts alone: with Fisher weighting, by their estimated loss at the lowest width.
    ranking = distortion[..., 0] if importance_kind == "fisher" else importance
    windows = load_windows(data, tokenizer, protocol, model)
    baseline = group_perplexities(model, windows, protocol.batch_size)
    rows = [{"plan": "original", "target_bits": 16, "avg_bits": 16.0, "domain": d, "lang": g, "perplexity": p,
             "vs_baseline": 1.0} for (d, g), p in baseline.items()]
    original = {name: value.clone() for name, value in model.state_dict().items()}
    plans = []
    for target in targets:
        if target in SUPPORTED_BITS:
            plans.append(("uniform", target, lambda t=target: uniform_plan(model, int(t), options)))
        if SUPPORTED_BITS[0] < target < SUPPORTED_BITS[-1]:
            plans.append(("tiered", target, lambda t=target: tiered_plan(model, ranking, t, options)))
        plans.append(("budget", target, lambda t=target: budget_plan(model, importance, distortion, SUPPORTED_BITS,
                                                                     avg_bits=t, options=options)))
    for kind, target, make in tqdm(plans, desc="sweep (quant)", unit="plan"):
        plan = make()
        average = memory_estimate(model, plan).expert_bits
        apply_bit_plan(model, plan)
        result = group_perplexities(model, windows, protocol.batch_size)
        model.load_state_dict(original)
        rows += [{"plan": kind, "target_bits": target, "avg_bits": round(average, 4), "domain": d, "lang": g,
                  "perplexity": p, "vs_baseline": p / baseline[(d, g)]} for (d, g), p in result.items()]
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def plot_sweep(rows: list[dict], x: str = "ratio", series: str = "criterion",
               xlabel: str = "share of experts removed per layer", reference: str = "unpruned") -> str:
    """One SVG: per domain, perplexity relative to the reference model against `x`, one line per
    `series` (geometric mean over the domain's languages); rows whose series is "none" (the
    reference itself) join every line."""
    from moescope.evaluate import geometric_mean
    from moescope.report import Chart

    names = list(dict.fromkeys(r[series] for r in rows if r[series] != "none"))
    domains = sorted({r["domain"] for r in rows})
    curves = {}
    for name in names:
        xs = sorted({r[x] for r in rows if r[series] in (name, "none")})
        for d in domains:
            curves[(name, d)] = (xs, [geometric_mean([r["vs_baseline"] for r in rows if r["domain"] == d
                                                      and r[x] == v and r[series] in (name, "none")]) for v in xs])
    every_x = [v for xs, _ in curves.values() for v in xs]
    top = max(max(ys) for _, ys in curves.values())
    bottom = min(1.0, min(min(ys) for _, ys in curves.values()))
    width, height, columns = 420, 240, 2
    panels = []
    for i, domain in enumerate(domains):
        chart = Chart((min(every_x), max(every_x)), (bottom, top * 1.05), width=width, height=height)
        chart.axes(xlabel, f"{domain}: perplexity / {reference}")
        for colour, name in zip(COLOURS, names):
            chart.line(*curves[(name, domain)], colour, title=name)
        chart.legend([(name, colour) for colour, name in zip(COLOURS, names)])
        left, y = (i % columns) * width, (i // columns) * height
        panels.append(chart.svg().replace("<svg ", f'<svg x="{left}" y="{y}" ', 1))
    rows_needed = (len(domains) + columns - 1) // columns
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{columns * width}" height="{rows_needed * height}" '
            f'style="font: 11px sans-serif">{"".join(panels)}</svg>\n')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moescope.quantize import SCALES

    sub = parser.add_subparsers(dest="sweep_kind", metavar="KIND", required=True)
    prune = sub.add_parser("prune", help="perplexity per domain vs share of experts pruned, per criterion",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("model_dir", metavar="MODEL_DIR")
    prune.add_argument("--profile", required=True, help="profile directory of this model")
    prune.add_argument("--ratios", default="0.02,0.05,0.1,0.15,0.25", help="shares of experts to prune per layer")
    prune.add_argument("--criteria", default="frequency,gate-mass,saliency", help="comma-separated criteria")
    prune.add_argument("--method", default="remove", choices=("remove", "mask", "zero", "soft", "row-1e9"))
    prune.add_argument("--offset", type=float, default=2.0, help="logit offset for --method soft")
    prune.add_argument("--calibration", help="JSONL text for the ablation criterion")
    prune.add_argument("--out", required=True, help="directory for sweep.csv and sweep.svg")
    quant = sub.add_parser("quant", help="perplexity per domain vs average bits: uniform, tiered, budget-allocated",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quant.add_argument("model_dir", metavar="MODEL_DIR")
    quant.add_argument("--profile", help="profile directory of this model (expert importance; not needed with "
                       "--importance fisher)")
    quant.add_argument("--bits", default="2.5,3,4", help="average bits per expert weight to compare plans at")
    quant.add_argument("--importance", default="gate-energy",
                       choices=("frequency", "gate-mass", "gate-energy", "saliency", "fisher"),
                       help="what ranks experts (default gate-energy); fisher: squared gradients of the --calibration "
                       "loss weigh each weight's error, as `moescope quantize --importance fisher`")
    quant.add_argument("--calibration", help="JSONL: allocate on output error on these prompts (default: weight error; "
                       "with --importance fisher, the prompts the gradients come from)")
    quant.add_argument("--scales", choices=SCALES, default="minmax",
                       help="how every plan's group scales are set, as `moescope quantize --scales` (default minmax)")
    quant.add_argument("--asymmetric", action="store_true", help="a scale and an offset per group in every plan")
    quant.add_argument("--out", required=True, help="directory for sweep.csv and sweep.svg")
    from moescope.evaluate import add_protocol_arguments

    add_protocol_arguments(prune)
    add_protocol_arguments(quant)


def run(args: argparse.Namespace) -> int:
    from moescope.evaluate import protocol_from_args

    if args.sweep_kind == "quant":
        rows = sweep_quant(args.model_dir, args.profile, parse_list(args.bits, float), args.data,
                           protocol_from_args(args), args.importance, args.calibration, args.scales,
                           not args.asymmetric)
        plot = plot_sweep([r for r in rows if r["plan"] != "original"], x="target_bits", series="plan",
                          xlabel="average bits per expert weight", reference="original")
    else:
        rows = sweep_prune(args.model_dir, args.profile, parse_list(args.ratios, float), parse_list(args.criteria),
                           args.method, args.data, protocol_from_args(args), args.calibration, args.offset)
        plot = plot_sweep(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sweep.csv")
    write_atomic(out / "sweep.svg", plot)
    print(f"wrote {out / 'sweep.csv'} ({len(rows)} rows) and {out / 'sweep.svg'}")
    return 0
