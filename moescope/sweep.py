"""`moescope sweep prune`: perplexity per domain against the share of experts pruned, per criterion.

The seeds pruned in stages by frequency only; this sweep puts every criterion side by side on the
same held-out data, so "frequency is a poor proxy for importance" becomes a measured statement.
Each (criterion, ratio) point builds a plan from the profile, applies it with the chosen method
(`remove`, `zero` and `row-1e9` through a real rewritten checkpoint in a temporary directory;
`mask` and `soft` as run-time logit offsets, which is what their checkpoint biases do) and
evaluates it with the fixed perplexity protocol of `moescope evaluate`.
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


def write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def plot_sweep(rows: list[dict]) -> str:
    """One SVG: per domain, perplexity relative to the unpruned model against the share pruned,
    one line per criterion (geometric mean over the domain's languages)."""
    from moescope.evaluate import geometric_mean
    from moescope.report import Chart

    criteria = list(dict.fromkeys(r["criterion"] for r in rows if r["criterion"] != "none"))
    domains = sorted({r["domain"] for r in rows})
    ratios = sorted({r["ratio"] for r in rows})
    curves = {(c, d): [geometric_mean([r["vs_baseline"] for r in rows if r["domain"] == d and r["ratio"] == x
                                       and r["criterion"] in (c, "none")]) for x in ratios]
              for c in criteria for d in domains}
    top = max(max(v) for v in curves.values())
    width, height, columns = 420, 240, 2
    panels = []
    for i, domain in enumerate(domains):
        chart = Chart((0, max(ratios)), (1, top * 1.05), width=width, height=height)
        chart.axes("share of experts removed per layer", f"{domain}: perplexity / unpruned")
        for colour, criterion in zip(COLOURS, criteria):
            chart.line(ratios, curves[(criterion, domain)], colour, title=criterion)
        chart.legend([(c, colour) for colour, c in zip(COLOURS, criteria)])
        x, y = (i % columns) * width, (i // columns) * height
        panels.append(chart.svg().replace("<svg ", f'<svg x="{x}" y="{y}" ', 1))
    rows_needed = (len(domains) + columns - 1) // columns
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{columns * width}" height="{rows_needed * height}" '
            f'style="font: 11px sans-serif">{"".join(panels)}</svg>\n')


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    from moescope.evaluate import add_protocol_arguments

    add_protocol_arguments(prune)


def run(args: argparse.Namespace) -> int:
    from moescope.evaluate import protocol_from_args

    rows = sweep_prune(args.model_dir, args.profile, parse_list(args.ratios, float), parse_list(args.criteria),
                       args.method, args.data, protocol_from_args(args), args.calibration, args.offset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sweep.csv")
    write_atomic(out / "sweep.svg", plot_sweep(rows))
    print(f"wrote {out / 'sweep.csv'} ({len(rows)} rows) and {out / 'sweep.svg'}")
    return 0
