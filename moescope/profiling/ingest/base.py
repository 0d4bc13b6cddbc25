"""What every engine-dump parser shares: the model's MoE shape, the two kinds of result, strict decoding.

A parser turns one dump file into either `Request`s (per-request expert ids, split into the prefill
and generation phases) or a `counts` array (selections summed over many requests). Engines index
layers by decoder layer and leave dense layers as rows of zeros; `ModelShape.moe_only` drops them
using the model's own MoE layers, and refuses a dump that routes a dense layer or names an expert
the model does not have: such a dump was made on another model.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.calibration import read_records
from moescope.errors import MoescopeError


@dataclass(frozen=True)
class ModelShape:
    """The facts of a model a dump is checked and laid out against."""

    num_hidden_layers: int
    moe_layers: tuple[int, ...]  # decoder-layer indices of the MoE layers, in forward order
    num_experts: int
    top_k: int

    def moe_only(self, ids: np.ndarray, where: str, dense_fill: int = 0) -> np.ndarray:
        """[tokens, num_hidden_layers, k] ids -> [tokens, MoE layers, k], after checking the dense
        layers hold only `dense_fill` and every MoE id names one of the model's experts."""
        if ids.ndim != 3 or ids.shape[1:] != (self.num_hidden_layers, self.top_k):
            raise MoescopeError(f"{where}: routing of shape {list(ids.shape)} does not fit this model's "
                                f"[tokens, {self.num_hidden_layers} layers, top-k {self.top_k}]; was it made on "
                                "another model?")
        dense = [i for i in range(self.num_hidden_layers) if i not in self.moe_layers]
        routed = [i for i in dense if (ids[:, i] != dense_fill).any()]
        if routed:
            raise MoescopeError(f"{where}: layer {routed[0]} is dense in this model but the dump routes tokens "
                                "through it; was it made on another model?")
        return self.check_ids(ids[:, list(self.moe_layers)], where)

    def check_ids(self, ids: np.ndarray, where: str) -> np.ndarray:
        """`ids` as int64 after checking they name experts of this model."""
        if not np.issubdtype(ids.dtype, np.integer):
            raise MoescopeError(f"{where}: expert ids must be integers, not {ids.dtype}")
        bad = (ids < 0) | (ids >= self.num_experts)
        if bad.any():
            raise MoescopeError(f"{where}: expert id {int(ids[bad][0])} is outside this model's {self.num_experts} "
                                "experts; was the dump made on another model?")
        return ids.astype(np.int64)

    def moe_counts(self, counts: np.ndarray, where: str) -> np.ndarray:
        """[num_hidden_layers, experts] counts -> [MoE layers, experts] int64, dense rows checked empty."""
        if counts.ndim != 2 or counts.shape != (self.num_hidden_layers, self.num_experts):
            raise MoescopeError(f"{where}: counts of shape {list(counts.shape)} do not fit this model's "
                                f"[{self.num_hidden_layers} layers, {self.num_experts} experts]; was the dump made "
                                "on another model?")
        dense = [i for i in range(self.num_hidden_layers) if i not in self.moe_layers and counts[i].any()]
        if dense:
            raise MoescopeError(f"{where}: layer {dense[0]} is dense in this model but the dump counts experts "
                                "there; was it made on another model?")
        if (counts < 0).any():
            raise MoescopeError(f"{where}: negative counts; the dump is corrupt")
        return counts[list(self.moe_layers)].astype(np.int64)


@dataclass
class Request:
    """One request's routing: [tokens, MoE layers, k] expert ids of its prompt and generated tokens."""

    id: str
    prefill: np.ndarray
    generation: np.ndarray


@dataclass
class IngestOptions:
    domain: str = "serving"  # domain of requests the tags file does not name (and of counts-only dumps)
    lang: str = "und"  # BCP-47 "undetermined"
    tags: str | None = None  # JSONL side file: {"id", "domain", "lang"} per request id
    coactivation: bool = False
    tensor_parallel: int = 1  # Megatron: ranks per tensor-parallel group (their counts repeat)


def json_bodies(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, body) for every response body saved in `path`, read as a stream: JSON Lines, one body (or
    a list of bodies, as a batched /generate returns) a line; a file holding one indented JSON document
    works too (it is read whole)."""
    for where, document in _json_documents(path):
        for index, body in enumerate(document if isinstance(document, list) else [document]):
            place = f"{where}[{index}]" if isinstance(document, list) else where
            if not isinstance(body, dict):
                raise MoescopeError(f"{place}: expected a response object, got {type(body).__name__}")
            yield place, body


def _json_documents(path: Path) -> Iterator[tuple[str, object]]:
    try:
        records = read_records(path)
        try:
            first = next(records, None)
        except MoescopeError:  # not JSON Lines: one indented document, or a broken file
            yield from _whole_document(path)
            return
        if first is not None:
            yield f"{path}:{first[0]}", first[1]
        for number, document in records:
            yield f"{path}:{number}", document
    except FileNotFoundError:
        raise MoescopeError(f"{path}: no such dump file") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise MoescopeError(f"{path}: not a text dump ({error})") from None


def _whole_document(path: Path) -> Iterator[tuple[str, object]]:
    try:
        yield str(path), json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MoescopeError(f"{path}: neither JSON Lines nor one JSON document ({error.msg} at line "
                            f"{error.lineno}); is the file truncated?") from None


def base64_bytes(value, where: str) -> bytes:
    """Strict standard base64 (a stray character or a cut-off end is an error, not a silent skip)."""
    if not isinstance(value, str):
        raise MoescopeError(f"{where}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise MoescopeError(f"{where}: the routing is not valid base64 ({error}); is the dump truncated?") from None


def phase_split(rows: int, prompt_tokens, completion_tokens, where: str, choices: int = 1) -> int:
    """How many rows of each choice belong to the prompt. Engines return prompt + completion - 1 - start
    rows per choice (its last generated token is never run; `start` prompt rows may be skipped on
    request), so `rows` over all choices is choices x (prompt - start) + completion - choices."""
    if not isinstance(prompt_tokens, int) or not isinstance(completion_tokens, int):
        raise MoescopeError(f"{where}: the response has no prompt_tokens / completion_tokens counts to split "
                            "prompt from generated tokens")
    prompt_rows, remainder = divmod(rows - completion_tokens + choices, choices)
    if remainder or not 0 <= prompt_rows <= prompt_tokens:
        raise MoescopeError(f"{where}: {rows} routing rows for {prompt_tokens} prompt and {completion_tokens} "
                            "completion tokens; the dump is truncated or was made on a model with another layer "
                            "count or top-k")
    return prompt_rows
