"""`moescope inspect MODEL_DIR`: the MoE structure of a local checkpoint, without loading weights.

Everything comes from config.json and the safetensors headers (moescope.models.inspection), so a
600 GB checkpoint is inspected in a second. It also says how much memory a verb will need for the
checkpoint at a dtype and batch (moescope.models.footprint explains the arithmetic).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moescope.checkpoints import read_config
from moescope.errors import MoescopeError
from moescope.models.footprint import BYTES, VERBS, footprint, format_size
from moescope.models.inspection import inspect_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    memory = parser.add_argument_group("memory estimate", "what a verb will need, before anything is loaded")
    memory.add_argument("--for", dest="sized_verb", metavar="VERB", choices=VERBS, default="profile",
                        help=f"the verb to size: {', '.join(VERBS)} (default profile)")
    memory.add_argument("--dtype", choices=tuple(BYTES), help="precision it runs at (default: as stored)")
    memory.add_argument("--batch-size", type=int, default=8, help="rows per forward call (default 8)")
    memory.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    memory.add_argument("--generate", type=int, default=0, help="tokens generated per row (profile, gate)")
    memory.add_argument("--saliency", action="store_true", help="profile with --saliency")


def run(args: argparse.Namespace) -> int:
    if min(args.batch_size, args.seq_len) < 1 or args.generate < 0:
        raise MoescopeError("--batch-size and --seq-len must be positive, --generate not negative")
    info = inspect_checkpoint(args.model_dir)
    needs = footprint(info, read_config(Path(args.model_dir)), args.sized_verb, args.dtype, args.batch_size,
                      args.seq_len, args.generate, args.saliency)
    if args.json:
        print(json.dumps({**info, "memory": needs.to_json()}, indent=2))
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
    memory = Table(title=f"memory for `moescope {args.sized_verb}` ({needs.dtype}), batch {args.batch_size} x "
                   f"{args.seq_len} tokens" + (f" + {args.generate} generated" if args.generate else ""),
                   show_header=False)
    for part, size in [*needs.parts.items(), ("total (estimate; see moescope.models.footprint)", needs.total)]:
        memory.add_row(part, format_size(size))
    Console().print(memory)
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
