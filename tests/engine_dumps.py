"""Files in each engine's own layout, written from routing moescope captured (for the ingest tests).

The layouts follow the engines' sources (named in docs/scale.md): the writers use the same
encoding calls the engines use (base64 of raw int32 bytes, np.save, torch.save, JSON lines).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from moescope.profiling.store import Profile


def routing_from_trace(trace: Path, profile: Profile, num_hidden_layers: int) -> dict[str, dict[str, np.ndarray]]:
    """{prompt id: {phase: int [tokens, num_hidden_layers, k]}} rebuilt from a moescope trace; layers the
    profile does not route (dense layers) are zeros, as engines leave them."""
    t = {k: np.asarray(v) for k, v in pq.read_table(trace).to_pydict().items()}
    k = int(t["rank"].max()) + 1
    out: dict[str, dict[str, np.ndarray]] = {}
    for prompt in profile.prompts:
        out[prompt["id"]] = {}
        for phase in ("prefill", "generation"):
            mine = (t["prompt_id"] == prompt["id"]) & (t["phase"] == phase)
            positions = np.unique(t["position"][mine])
            ids = np.zeros((len(positions), num_hidden_layers, k), np.int32)
            row = np.searchsorted(positions, t["position"][mine])
            ids[row, t["layer"][mine], t["rank"][mine]] = t["expert"][mine]
            out[prompt["id"]][phase] = ids
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("utf-8")


def sglang_generate(request_id: str, phases: dict[str, np.ndarray]) -> dict:
    """A /generate response item: raw little-endian int32 bytes, base64, under meta_info."""
    ids = np.concatenate([phases["prefill"], phases["generation"]])
    return {"text": "", "meta_info": {"id": request_id, "prompt_tokens": len(phases["prefill"]),
                                      "completion_tokens": len(phases["generation"]) + 1,
                                      "routed_experts": b64(np.ascontiguousarray(ids, "<i4").tobytes())}}


def sglang_chat(request_id: str, phases: dict[str, np.ndarray]) -> dict:
    """An OpenAI-compatible chat response: the same string under the response-level `sglext`."""
    item = sglang_generate(request_id, phases)["meta_info"]
    return {"id": request_id, "object": "chat.completion", "choices": [{"index": 0, "message": {}}],
            "usage": {"prompt_tokens": item["prompt_tokens"], "completion_tokens": item["completion_tokens"]},
            "sglext": {"routed_experts": item["routed_experts"]}}


def vllm_npy(request_id: str, phases: dict[str, np.ndarray], num_experts: int) -> dict:
    """vLLM >= 0.22: each choice's routing (prompt rows included) as base64 of .npy bytes."""
    buffer = io.BytesIO()
    ids = np.concatenate([phases["prefill"], phases["generation"]])
    np.save(buffer, ids.astype(np.uint8 if num_experts <= 256 else np.uint16), allow_pickle=False)
    return {"id": request_id, "object": "chat.completion",
            "choices": [{"index": 0, "message": {}, "routed_experts": b64(buffer.getvalue())}],
            "usage": {"prompt_tokens": len(phases["prefill"]), "completion_tokens": len(phases["generation"]) + 1}}


def vllm_lists(request_id: str, phases: dict[str, np.ndarray], moe_layers: list[int]) -> dict:
    """vLLM 0.21: nested lists over the MoE layers only, the prompt's rows at top level."""
    return {"id": request_id, "prompt_routed_experts": phases["prefill"][:, moe_layers].tolist(),
            "choices": [{"index": 0, "message": {}, "routed_experts": phases["generation"][:, moe_layers].tolist()}],
            "usage": {"prompt_tokens": len(phases["prefill"]), "completion_tokens": len(phases["generation"]) + 1}}


def write_jsonl(path: Path, bodies: list[dict]) -> Path:
    path.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    return path


def all_ids(routing: dict) -> np.ndarray:
    """Every token's routing, all prompts and phases: [tokens, num_hidden_layers, k]."""
    return np.concatenate([phases[p] for phases in routing.values() for p in ("prefill", "generation")])


def layer_counts(routing: dict, num_experts: int) -> np.ndarray:
    """[num_hidden_layers, experts] selection counts (dense layers counted as expert 0: callers zero them)."""
    ids = all_ids(routing)
    return np.stack([np.bincount(ids[:, layer].ravel(), minlength=num_experts) for layer in range(ids.shape[1])])


def sglang_stat(path: Path, counts: np.ndarray, passes: int = 3) -> Path:
    """stat mode: logical_count [passes, layers, experts] int32 (spread over buffered passes, one left empty)."""
    steps = np.zeros((passes, *counts.shape), np.int32)
    steps[0] = counts // 2
    steps[1] = counts - counts // 2
    torch.save({"rank": 0, "logical_count": torch.from_numpy(steps), "average_utilization_rate_over_window": None},
               path)
    return path


def sglang_per_pass(path: Path, counts: np.ndarray, redundant: list[int]) -> Path:
    """per_pass mode: physical counts with a redundant copy of each expert in `redundant`, which takes
    half of that expert's selections, and the physical-to-logical map."""
    layers, experts = counts.shape
    to_logical = np.tile(np.concatenate([np.arange(experts), redundant]), (layers, 1)).astype(np.int64)
    physical = np.concatenate([counts, np.zeros((layers, len(redundant)), counts.dtype)], axis=1)
    for slot, expert in enumerate(redundant):
        physical[:, experts + slot] = counts[:, expert] // 2
        physical[:, expert] -= counts[:, expert] // 2
    records = [{"forward_pass_id": 0, "rank": 0, "gatherer_key": "primary",
                "global_physical_count": torch.from_numpy(physical.astype(np.int32))}]
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(to_logical)}, path)
    return path


def sglang_per_token(path: Path, ids: np.ndarray, num_experts: int) -> Path:
    """per_token mode from dumps before global_physical_count: topk_ids_of_layer [layers, tokens, 8], -1 padded."""
    tokens, layers, k = ids.shape
    padded = np.full((layers, tokens, 8), -1, np.int32)
    padded[:, :, :k] = ids.transpose(1, 0, 2)
    records = [{"forward_pass_id": 0, "rank": 0, "gatherer_key": "primary", "input_ids": [0] * tokens,
                "positions": list(range(tokens)), "extend_seq_lens": [tokens], "forward_mode": 1,
                "topk_ids_of_layer": torch.from_numpy(padded), "misc_objects": []}]
    to_logical = torch.arange(num_experts, dtype=torch.long).repeat(layers, 1)
    torch.save({"records": records, "last_physical_to_logical_map": to_logical}, path)
    return path


def megatron_tpe(directory: Path, counts: np.ndarray, moe_layers: list[int], expert_parallel: int,
                 tensor_parallel: int = 1) -> list[Path]:
    """tokens_per_expert/rank{r}.jsonl: each rank's local experts, two micro-batches per line; ranks of one
    tensor-parallel group log the same counts."""
    directory.mkdir(parents=True, exist_ok=True)
    local = counts.shape[1] // expert_parallel
    paths = []
    for rank in range(expert_parallel * tensor_parallel):
        ep_rank = rank // tensor_parallel % expert_parallel
        lines = []
        for layer in moe_layers:
            mine = counts[layer, ep_rank * local : (ep_rank + 1) * local]
            lines.append({"iter": 10, "block": "decoder", "layer": layer,
                          "tpe": [(mine // 3).tolist(), (mine - mine // 3).tolist()]})
        lines.append({"iter": 10, "block": "mtp", "mtp_idx": 0, "layer": 0, "tpe": [[5] * local]})
        paths.append(write_jsonl(directory / f"rank{rank}.jsonl", lines))
    return paths
