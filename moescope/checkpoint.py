"""Rewrite a safetensors checkpoint tensor by tensor, in the checkpoint's own on-disk key layout.

The source is never modified. Shards are processed one at a time (peak memory about one shard),
written into a temporary directory beside the output and renamed at the end, so a crash or a full
disk never leaves something that looks like a finished checkpoint. Tensors an edit does not touch
are written back byte for byte (bf16 included). config.json is edited as a JSON dict with its own
key names (re-serialising `model.config` would rename keys that other runtimes read), and every
other file (tokenizer, generation config, ...) is copied.

Keys are recognised by name, in whatever layout the checkpoint uses on disk:
per-expert (`model.layers.3.mlp.experts.7.gate_proj.weight`), fused (`...experts.gate_up_proj`,
experts first), and router tensors (a `gate`/`router` tensor of the layer whose first dimension is
the expert count: weight rows, a logit bias or a correction bias).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from moescope.errors import MoescopeError
from moescope.loading import check_checkpoint_dir

LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")
EXPERT = re.compile(r"\.experts\.(?:(\d+)\.)?")
ROUTER = re.compile(r"(?:^|\.)(?:gate|router)\b|e_score_correction_bias|expert_bias")
INDEX_NAME = "model.safetensors.index.json"
METADATA_KEY = "moescope"


@dataclass(frozen=True)
class KeyInfo:
    """What a tensor name says about its place in the MoE structure."""

    layer: int | None
    kind: str  # "expert" (one expert's tensor), "fused" (all experts stacked), "router", "other"
    expert: int | None = None


def classify(name: str, shape: tuple[int, ...], experts_per_layer: dict[int, int]) -> KeyInfo:
    layer_match = LAYER.search(name)
    layer = int(layer_match.group(1)) if layer_match else None
    if layer not in experts_per_layer:
        return KeyInfo(layer, "other")
    expert_match = EXPERT.search(name)
    if expert_match:
        index = expert_match.group(1)
        return KeyInfo(layer, "expert", int(index)) if index is not None else KeyInfo(layer, "fused")
    tail = name[layer_match.end():]
    if ROUTER.search(tail) and "shared" not in tail and shape and \
            shape[0] == experts_per_layer[layer]:
        return KeyInfo(layer, "router")
    return KeyInfo(layer, "other")


def per_expert_view(tensor: torch.Tensor, num_experts: int) -> torch.Tensor:
    """A fused tensor as [E, ...]: experts first, or DBRX's [E * I, H] split into [E, I, H]."""
    if tensor.shape[0] == num_experts:
        return tensor
    if tensor.shape[0] % num_experts:
        raise MoescopeError(f"cannot split a tensor of shape {tuple(tensor.shape)} into {num_experts} experts")
    return tensor.view(num_experts, tensor.shape[0] // num_experts, *tensor.shape[1:])


def shards(model_dir: Path) -> list[str]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise MoescopeError(f"{model_dir} has no .safetensors files: convert the checkpoint to safetensors first")
    return files


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            yield name, handle.get_tensor(name)


def shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the headers only."""
    result = {}
    for shard in shards(model_dir):
        with safe_open(str(model_dir / shard), framework="pt") as handle:
            for name in handle.keys():
                result[name] = tuple(handle.get_slice(name).get_shape())
    return result


Edit = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


def rewrite_checkpoint(
    source: str | Path,
    out: str | Path,
    edit: Edit,
    *,
    config_edit: Callable[[dict], dict] | None = None,
    metadata: dict | None = None,
    description: str = "rewriting",
) -> Path:
    """Write `source` to `out` with `edit(name, tensor) -> [(name, tensor), ...]` applied to every tensor.

    An edit returns [] to drop a tensor, and may rename it. `metadata` (JSON-able) is stored in every
    shard's safetensors metadata under "moescope", so each output says how it was made.
    """
    source = check_checkpoint_dir(source)
    out = Path(out)
    if out.exists():
        raise MoescopeError(f"{out} already exists: choose a new output directory or remove it first")
    if out.resolve() == source.resolve():
        raise MoescopeError("the output directory must differ from the source: moescope never edits a checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    shard_meta = {"format": "pt", METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)}
    try:
        weight_map, total_size = {}, 0
        for shard in tqdm(shards(source), desc=description, unit="shard"):
            tensors = {}
            for name, tensor in iter_tensors(source / shard):
                for new_name, new_tensor in edit(name, tensor):
                    tensors[new_name] = new_tensor.contiguous()
                    weight_map[new_name] = shard
                    total_size += new_tensor.numel() * new_tensor.element_size()
            save_file(tensors, str(work / shard), metadata=shard_meta)
            del tensors
        if (source / INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (work / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = json.loads((source / "config.json").read_text())
        (work / "config.json").write_text(json.dumps(config_edit(config) if config_edit else config, indent=2) + "\n")
        for path in source.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and path.name not in (INDEX_NAME, "config.json"):
                shutil.copy2(path, work / path.name)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def read_metadata(model_dir: str | Path) -> dict:
    """The moescope metadata recorded in a rewritten checkpoint ({} if none)."""
    model_dir = Path(model_dir)
    with safe_open(str(model_dir / shards(model_dir)[0]), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
