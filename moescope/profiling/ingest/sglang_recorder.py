"""SGLang's expert-distribution recorder: selection counts dumped with torch.save, no request detail.

`--expert-distribution-recorder-mode` and the /start_, /stop_ and /dump_expert_distribution_record
endpoints write `expert_distribution_recorder_*.pt` under SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR:
- stat (and stat_approx): {"logical_count": int32 [passes, num_hidden_layers, experts]}, one
  slice per buffered forward pass (unused slices are zeros), already summed over all ranks;
- per_pass and per_token: one file per rank, {"records": [{"global_physical_count": [layers,
  physical experts], ...}], "last_physical_to_logical_map": [layers, physical experts]}; per_token
  records also hold `topk_ids_of_layer` [layers, tokens, 8] (-1 = no expert), from which the counts
  are rebuilt when a record lacks `global_physical_count` (dumps before late 2025).
Physical slots (redundant copies under EPLB) are mapped back to logical experts with the last map.
Every rank counts the tokens it routes: under plain tensor parallelism each token is counted once
per rank, which multiplies the counts, not their shares. Files are loaded with weights_only=True.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError
from moescope.profiling.ingest.base import IngestOptions, ModelShape

NAME = "sglang-recorder"
PER_REQUEST = False
DESCRIPTION = "SGLang expert_distribution_recorder_*.pt dumps (stat, per_pass or per_token mode)"


def read(path: Path, shape: ModelShape, options: IngestOptions) -> np.ndarray:
    """[MoE layers, experts] selection counts of one dump file."""
    dump = _load(path)
    if not isinstance(dump, dict):
        raise MoescopeError(f"{path}: not an expert-distribution dump (expected a dict, got {type(dump).__name__})")
    if "logical_count" in dump:
        counts = np.asarray(dump["logical_count"], dtype=np.int64)
        return shape.moe_counts(counts.sum(0) if counts.ndim == 3 else counts, str(path))
    if "records" not in dump or "last_physical_to_logical_map" not in dump:
        raise MoescopeError(f"{path}: neither logical_count (stat mode) nor records (per_pass, per_token); not an "
                            "expert-distribution dump")
    to_logical = np.asarray(dump["last_physical_to_logical_map"], dtype=np.int64)
    if to_logical.ndim != 2 or to_logical.shape[0] != shape.num_hidden_layers:
        raise MoescopeError(f"{path}: a physical-to-logical map of shape {list(to_logical.shape)} does not fit this "
                            f"model's {shape.num_hidden_layers} layers; was the dump made on another model?")
    physical = np.zeros(to_logical.shape, np.int64)
    for record in dump["records"]:
        physical += _physical_counts(record, to_logical.shape, path)
    logical = np.zeros((shape.num_hidden_layers, shape.num_experts), np.int64)
    shape.check_ids(to_logical[list(shape.moe_layers)], f"{path} physical-to-logical map")
    for layer in shape.moe_layers:
        np.add.at(logical[layer], to_logical[layer], physical[layer])
    dense = [i for i in range(shape.num_hidden_layers) if i not in shape.moe_layers and physical[i].any()]
    if dense:
        raise MoescopeError(f"{path}: layer {dense[0]} is dense in this model but the dump counts experts there; "
                            "was it made on another model?")
    return logical[list(shape.moe_layers)]


def _physical_counts(record, layout: tuple[int, int], path: Path) -> np.ndarray:
    """[layers, physical experts] counts of one forward-pass record."""
    if not isinstance(record, dict):
        raise MoescopeError(f"{path}: a record is not a dict; the dump is corrupt")
    if record.get("global_physical_count") is not None:
        counts = np.asarray(record["global_physical_count"], dtype=np.int64)
    elif record.get("topk_ids_of_layer") is not None:
        ids = np.asarray(record["topk_ids_of_layer"], dtype=np.int64)  # [layers, tokens, 8], -1 = none
        if ids.ndim != 3 or ids.shape[0] != layout[0] or ids.max(initial=-1) >= layout[1]:
            raise MoescopeError(f"{path}: topk_ids_of_layer of shape {list(ids.shape)} do not fit the dump's "
                                f"{layout[0]} layers x {layout[1]} physical experts")
        counts = np.stack([np.bincount(row[row >= 0], minlength=layout[1]) for row in ids.reshape(layout[0], -1)])
    else:
        raise MoescopeError(f"{path}: a record has neither global_physical_count nor topk_ids_of_layer")
    if counts.shape != layout:
        raise MoescopeError(f"{path}: counts of shape {list(counts.shape)} do not match the physical-to-logical "
                            f"map's {list(layout)}; the dump is corrupt")
    return counts


def _load(path: Path):
    """The dump's dict, tensors as numpy; loaded to the CPU (stat dumps keep tensors on the GPU)."""
    import torch

    if not path.is_file():
        raise MoescopeError(f"{path}: no such dump file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MoescopeError(f"{path}: not a readable torch.save dump ({first}); is it truncated?") from None

    def plain(value):
        if isinstance(value, torch.Tensor):
            return value.numpy()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, list) else value

    return plain(data)
