"""vLLM's `routed_experts`: the routing of every token of a request, per choice of an OpenAI-style response.

Started with `--enable-return-routed-experts`, vLLM adds it to every non-streaming response:
- 0.22 and later: `choices[i].routed_experts` is base64 of a .npy file (uint8 for up to 256
  experts, else uint16) of shape [prompt + generated - 1 - start, num_hidden_layers, top_k]: each
  choice carries the prompt's rows too; dense layers are rows of zeros.
- 0.21: nested JSON lists, the prompt's rows once in the top-level `prompt_routed_experts`, each
  choice's generated rows in `choices[i].routed_experts`, and the layer axis holds the MoE layers only.
The ids are logical expert ids (vLLM 0.15 recorded physical ids under EPLB). Save one response a line.
"""

from __future__ import annotations

import io

import numpy as np

from moescope.errors import MoescopeError
from moescope.profiling.ingest.base import ModelShape, Request, base64_bytes, phase_split

NAME = "vllm"
PER_REQUEST = True
DESCRIPTION = "vLLM OpenAI-compatible responses with routed_experts (0.21 lists or 0.22+ base64 .npy), one a line"


def request(where: str, body: dict, shape: ModelShape) -> Request:
    """One saved response body as a request (its choices share the request's prompt)."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MoescopeError(f"{where}: no choices in the response; is it a vLLM chat or completion response?")
    values = [c.get("routed_experts") if isinstance(c, dict) else None for c in choices]
    if any(v is None for v in values):
        raise MoescopeError(f"{where}: a choice has no routed_experts; start vLLM with "
                            "--enable-return-routed-experts (streamed responses do not carry it)")
    request_id = str(body["id"]) if body.get("id") is not None else where
    if "prompt_routed_experts" in body:
        return _read_lists(body, values, shape, where, request_id)
    return _read_npy(body, values, shape, where, request_id)


def _read_npy(body: dict, values: list, shape: ModelShape, where: str, request_id: str) -> Request:
    """0.22+: every choice repeats the prompt's rows; they are counted once, from the first choice."""
    arrays = []
    for index, value in enumerate(values):
        place = f"{where} choice {index}"
        try:
            array = np.load(io.BytesIO(base64_bytes(value, place)), allow_pickle=False)
        except (ValueError, EOFError, OSError) as error:
            raise MoescopeError(f"{place}: the routing is not a whole .npy array ({error}); is the dump "
                                "truncated?") from None
        arrays.append(shape.moe_only(np.asarray(array), place))
    usage = body.get("usage") or {}
    prompt = phase_split(sum(len(a) for a in arrays), usage.get("prompt_tokens"), usage.get("completion_tokens"),
                         where, len(arrays))
    return Request(request_id, arrays[0][:prompt], np.concatenate([a[prompt:] for a in arrays]))


def _read_lists(body: dict, values: list, shape: ModelShape, where: str, request_id: str) -> Request:
    """0.21: nested lists with a compact axis of MoE layers."""
    parts = []
    for place, value in [(f"{where} prompt_routed_experts", body["prompt_routed_experts"])] + \
            [(f"{where} choice {i}", v) for i, v in enumerate(values)]:
        try:
            array = np.asarray(value, dtype=np.int64).reshape(-1, len(shape.moe_layers), shape.top_k)
        except (ValueError, TypeError):
            raise MoescopeError(f"{place}: routing is not a [tokens, {len(shape.moe_layers)} MoE layers, top-k "
                                f"{shape.top_k}] list of ids; was it made on another model?") from None
        parts.append(shape.check_ids(array, place))
    return Request(request_id, parts[0], np.concatenate(parts[1:]))
