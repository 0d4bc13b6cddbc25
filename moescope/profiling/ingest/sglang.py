"""SGLang's `return_routed_experts`: the routing of every token of a request, returned with the response.

Started with `--enable-return-routed-experts` and asked for per request (`"return_routed_experts":
true`), SGLang returns the routing as base64 of raw int32 bytes (no header) of shape [prompt +
completion - 1 - start, num_hidden_layers, top_k]: under `meta_info.routed_experts` of a /generate
item, under `sglext.routed_experts` of an OpenAI-compatible response. Dense layers are rows of
zeros; the ids are logical (checkpoint) expert ids. Save one response body a line (JSON Lines).
"""

from __future__ import annotations

import numpy as np

from moescope.errors import MoescopeError
from moescope.profiling.ingest.base import ModelShape, Request, base64_bytes, phase_split

NAME = "sglang"
PER_REQUEST = True
DESCRIPTION = "SGLang responses with return_routed_experts (/generate or OpenAI-compatible), one a line"


def request(where: str, body: dict, shape: ModelShape) -> Request:
    """One saved response body as a request."""
    if "meta_info" in body:
        meta = body["meta_info"] or {}
        encoded, request_id = meta.get("routed_experts"), meta.get("id")
        prompt_tokens, completion_tokens = meta.get("prompt_tokens"), meta.get("completion_tokens")
    else:
        usage = body.get("usage") or {}
        encoded, request_id = (body.get("sglext") or {}).get("routed_experts"), body.get("id")
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if encoded is None:
        raise MoescopeError(f"{where}: no routed_experts in the response; start SGLang with "
                            "--enable-return-routed-experts and send \"return_routed_experts\": true")
    raw = base64_bytes(encoded, where)
    row = shape.num_hidden_layers * shape.top_k * 4
    if len(raw) % row:
        raise MoescopeError(f"{where}: {len(raw)} bytes of routing do not make whole rows of "
                            f"{shape.num_hidden_layers} layers x top-k {shape.top_k} int32 ids; the dump is "
                            "truncated or was made on another model")
    ids = np.frombuffer(raw, dtype="<i4").reshape(-1, shape.num_hidden_layers, shape.top_k)
    prompt_rows = phase_split(len(ids), prompt_tokens, completion_tokens, where)
    ids = shape.moe_only(ids, where)
    return Request(str(request_id) if request_id is not None else where, ids[:prompt_rows], ids[prompt_rows:])
