"""`moescope inspect MODEL_DIR`: the MoE structure of a local checkpoint, without loading weights.

Everything comes from config.json and the safetensors headers (a JSON header at the start of each
file), so a 600 GB checkpoint is inspected in a second. Expert tensors are recognised by their
names on disk: per-expert keys (`...experts.3.gate_proj.weight`) or fused ones
(`...experts.gate_up_proj` with the expert count as first dimension).
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.loading import check_checkpoint_dir

EXPERT_KEY = re.compile(r"\.experts\.(?:(\d+)\.)?")
LAYER_NUMBER = re.compile(r"\.(\d+)\.")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: Path) -> dict:
    """Tensor name -> {dtype, shape, data_offsets} from one safetensors file's header."""
    with open(path, "rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) < 8:
            raise MoescopeError(f"{path} is not a safetensors file (too short); re-save the checkpoint")
        (size,) = struct.unpack("<Q", size_bytes)
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoescopeError(f"{path} has a corrupt safetensors header; re-save the checkpoint") from None
    header.pop("__metadata__", None)
    return header


def read_tensors(model_dir: Path) -> dict[str, dict]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise MoescopeError(f"{model_dir} has no .safetensors files: convert the checkpoint to safetensors first")
    tensors = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    return tensors


def numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def inspect_checkpoint(model_dir: str | Path) -> dict:
    """A JSON-ready description of the checkpoint's MoE structure."""
    from moescope.models import EXPERT_COUNT_KEYS, TOP_K_KEYS, family_for

    model_dir = check_checkpoint_dir(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config") or config
    model_type = text.get("model_type") or config.get("model_type", "unknown")
    nested = [text, text.get("ffn_config") or {}]
    expert_count = next((c[k] for c in nested for k in EXPERT_COUNT_KEYS if isinstance(c.get(k), int)), None)
    top_k = next((c[k] for c in nested for k in TOP_K_KEYS if isinstance(c.get(k), int)), None)

    tensors = read_tensors(model_dir)
    total_params = total_bytes = expert_params = expert_bytes = 0
    experts_seen: dict[int, set[int]] = defaultdict(set)
    fused_counts: dict[int, int] = {}
    shared = False
    for name, info in tensors.items():
        size = numel(info["shape"])
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        total_params += size
        total_bytes += nbytes
        shared = shared or "shared_expert" in name or "shared_mlp" in name
        match = EXPERT_KEY.search(name)
        if not match:
            continue
        expert_params += size
        expert_bytes += nbytes
        layer_match = LAYER_NUMBER.search(name)
        layer = int(layer_match.group(1)) if layer_match else 0
        if match.group(1) is not None:
            experts_seen[layer].add(int(match.group(1)))
        elif info["shape"]:
            fused_counts[layer] = info["shape"][0]
    layers = sorted(set(experts_seen) | set(fused_counts))
    if not layers:
        raise MoescopeError(f"no MoE layers found in {model_type}: no tensor in {model_dir} is named '*.experts.*'")
    per_layer = {
        layer: len(experts_seen[layer]) if experts_seen.get(layer) else expert_count or fused_counts[layer]
        for layer in layers
    }
    total_experts = sum(per_layer.values())
    family = family_for(model_type)
    renormalize = family.model_types.get(model_type, "config")
    if renormalize == "config":
        renormalize = bool(text.get("norm_topk_prob", False))
    return {
        "model_type": model_type,
        "moe_layers": layers,
        "num_layers": text.get("num_hidden_layers", text.get("n_layers")),
        "experts_per_layer": per_layer,
        "top_k": top_k,
        "router_family": family.name,
        "renormalize": renormalize,
        "shared_expert": shared,
        "params_total": total_params,
        "params_in_experts": expert_params,
        "expert_share": expert_params / total_params if total_params else 0.0,
        "bytes_per_expert": expert_bytes // total_experts,
        "bytes_total": total_bytes,
    }


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    info = inspect_checkpoint(args.model_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

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
