"""`moescope evaluate MODEL_DIR [--baseline BASE_DIR]`: perplexity per domain and language, and against a
baseline the KL, top-1 agreement and routing drift (moescope.judge.evaluate explains the protocol).
Either side may be an mlx-lm model (`--backend`, `--baseline-backend`; converted checkpoints are found
on their own)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from rich.console import Console
from rich.table import Table

from moescope.commands.common import add_backend_argument, add_protocol_arguments, protocol_from_args
from moescope.judge.evaluate import evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint to evaluate")
    parser.add_argument("--baseline", metavar="BASE_DIR", help="compare with this (uncompressed) checkpoint")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_protocol_arguments(parser)
    add_backend_argument(parser)
    add_backend_argument(parser, "--baseline-backend", "BASE_DIR")


def run(args: argparse.Namespace) -> int:
    protocol = dataclasses.replace(protocol_from_args(args), backend=args.backend,
                                   baseline_backend=args.baseline_backend)
    report = evaluate(args.model_dir, protocol, args.data, args.baseline)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    compared = "baseline" in report
    table = Table(title=f"{args.model_dir}: perplexity, {report['seq_len']}-token windows")
    columns = ["domain/lang", "windows", "perplexity"] + (["baseline", "ratio", "KL", "top-1"] if compared else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "domain/lang" else "right")
    for group, row in report["groups"].items():
        cells = [group, str(row["windows"]), f"{row['perplexity']:.3f}"]
        if compared:
            cells += [f"{row['baseline_perplexity']:.3f}", f"{row['ratio']:.3f}", f"{row['kl']:.4f}",
                      f"{row['top1_agreement']:.1%}"]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    line = f"geometric mean perplexity {report['perplexity_geomean']:.3f}"
    if compared:
        line += f" (baseline {report['baseline_perplexity_geomean']:.3f}); routing drift per layer: " + ", ".join(
            f"{layer}: {share:.1%}" for layer, share in report["routing_drift"].items())
    console.print(line)
    return 0
