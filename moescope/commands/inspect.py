"""`moescope inspect MODEL_DIR`: the MoE structure of a local checkpoint, without loading weights.

Everything comes from config.json and the safetensors headers (moescope.models.inspection), so a
600 GB checkpoint is inspected in a second.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from moescope.models.inspection import inspect_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.model_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    counts = sorted(set(info["experts_per_layer"].values()))
    table = Table(title=f"{args.model_dir} ({info['model_type']})", show_header=False)
    rows = [
        ("MoE layers", f"{len(info['moe_layers'])} of {info['num_layers']}: {compact(info['moe_layers'])}"),
        ("experts per layer", ", ".join(map(str, counts))),
        ("top-k", str(info["top_k"])),
        ("router family", info["router_family"]),
        ("top-k weights renormalised", "yes" if info["renormalize"] else "no"),
        ("shared expert", "yes" if info["shared_expert"] else "no"),
        ("parameters", f"{info['params_total']:,} ({info['expert_share']:.1%} in routed experts)"),
        ("bytes per expert", f"{info['bytes_per_expert']:,}"),
        ("checkpoint size", f"{info['bytes_total'] / 2**20:,.1f} MiB"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    return 0


def compact(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"{start}-{n}" if n != start else str(n))
            start = None
    return ", ".join(spans)
