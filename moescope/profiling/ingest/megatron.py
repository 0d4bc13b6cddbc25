"""Megatron-LM's tokens-per-expert logs (`--save-tokens-per-expert-interval N`, core 0.18 and later).

Each rank appends to `{--save}/tokens_per_expert/rank{global rank}.jsonl` one line per logged
iteration and MoE layer: {"iter", "block": "decoder" | "mtp", "layer", "tpe": [[tokens per local
expert] per micro-batch]} (the first version had no "block"). `layer` is the index in the stage's
`decoder.layers`; with expert parallelism a rank holds experts ep_rank x local .. (ep_rank + 1) x
local - 1. Ranks are laid out tensor-parallel first (Megatron's default order tp-cp-ep-dp-pp), so
with context and pipeline parallelism 1, ep_rank = (rank // tp) mod ep, and ranks of one
tensor-parallel group log the same tokens: only tp-rank 0 is read. Multi-token-prediction lines
are skipped (those layers are not the model's decoder layers). The counts are taken after
dispatch; with --fp8/--fp4 Megatron pads them, which this reader cannot undo.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError
from moescope.profiling.ingest.base import IngestOptions, ModelShape

NAME = "megatron"
PER_REQUEST = False
DESCRIPTION = "Megatron-LM tokens_per_expert/rank*.jsonl (--save-tokens-per-expert-interval)"
RANK_FILE = re.compile(r"rank(\d+)\.jsonl$")


def read(path: Path, shape: ModelShape, options: IngestOptions) -> np.ndarray:
    """[MoE layers, experts] selection counts of one rank's file (zeros for a repeating tensor-parallel rank)."""
    counts = np.zeros((shape.num_hidden_layers, shape.num_experts), np.int64)
    match = RANK_FILE.search(path.name)
    rank = int(match.group(1)) if match else None
    if rank is not None and rank % options.tensor_parallel:
        return counts[list(shape.moe_layers)]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MoescopeError(f"{path}: cannot read the log ({error})") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            _add_line(counts, line, f"{path}:{number}", rank, shape, options)
    return shape.moe_counts(counts, str(path))


def _add_line(counts: np.ndarray, line: str, where: str, rank: int | None, shape: ModelShape,
              options: IngestOptions) -> None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise MoescopeError(f"{where}: not JSON ({error.msg}); is the log truncated?") from None
    if not isinstance(record, dict) or "layer" not in record or "tpe" not in record:
        raise MoescopeError(f"{where}: not a tokens-per-expert line (needs 'layer' and 'tpe')")
    if record.get("block", "decoder") != "decoder":
        return
    try:
        tpe = np.asarray(record["tpe"], dtype=np.int64)
        layer = int(record["layer"])
    except (TypeError, ValueError):
        raise MoescopeError(f"{where}: 'tpe' must be a list of lists of token counts, 'layer' an integer") from None
    if tpe.ndim != 2 or tpe.shape[1] == 0 or shape.num_experts % tpe.shape[1]:
        raise MoescopeError(f"{where}: {list(tpe.shape)} counts do not split this model's {shape.num_experts} "
                            "experts evenly over expert-parallel ranks; was the log made on another model?")
    if not 0 <= layer < shape.num_hidden_layers:
        raise MoescopeError(f"{where}: layer {layer} is outside this model's {shape.num_hidden_layers} layers "
                            "(pipeline-parallel logs number layers per stage; they are not supported)")
    local = tpe.shape[1]
    parallel = shape.num_experts // local
    if parallel > 1 and rank is None:
        raise MoescopeError(f"{where}: the log covers {local} of {shape.num_experts} experts, so its rank must "
                            "come from its name (rank<N>.jsonl)")
    first = ((rank or 0) // options.tensor_parallel % parallel) * local
    counts[layer, first : first + local] += tpe.sum(0)
