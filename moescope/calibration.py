"""Tagged calibration sets: JSONL in, token ids out.

One JSON object a line: `id`, `domain`, `lang` (BCP-47) and either `text` or `messages` (a chat,
rendered with the tokenizer's chat template when it has one); probe sets may add `expect`. Every
validation error names `file:line`, because calibration files are written by hand.

Prompts keep their file order: batches are cut in that order so that a resumed run, or a set split
into shards, sees exactly the batches an uninterrupted run over the whole set sees.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError

ASSETS = Path(__file__).resolve().parent / "assets"  # the embedded demo model and data sets
DEMO_MODEL = ASSETS / "demo-moe"
CALIBRATION = ASSETS / "calibration.jsonl"
HELDOUT = ASSETS / "heldout"
PROBES = ASSETS / "probes.jsonl"
BCP47 = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")


@dataclass
class Prompt:
    id: str
    domain: str
    lang: str
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    expect: Any = None

    @property
    def hash(self) -> str:
        """Content hash of what gets profiled (not `expect`), stable across files and orderings."""
        content = {"id": self.id, "domain": self.domain, "lang": self.lang,
                   "text": self.text, "messages": self.messages}
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Encoded:
    """A prompt and its token ids (already capped at the token limit)."""

    prompt: Prompt
    ids: list[int]
    truncated: bool = False


def set_hash(prompt_hashes: list[str]) -> str:
    """Hash of a set of prompts: independent of order, so merged shards hash like the whole set."""
    return hashlib.sha256("\n".join(sorted(prompt_hashes)).encode()).hexdigest()


def _parse(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise MoescopeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("id", "domain", "lang"):
        if key not in record:
            raise MoescopeError(f"{where}: missing field '{key}'")
    if not isinstance(record["id"], str | int) or str(record["id"]) == "":
        raise MoescopeError(f"{where}: 'id' must be a non-empty string or an integer")
    for key in ("domain", "lang"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise MoescopeError(f"{where}: '{key}' must be a non-empty string")
    if not BCP47.match(record["lang"]):
        raise MoescopeError(f"{where}: 'lang' {record['lang']!r} is not a BCP-47 tag such as 'en' or 'zh-Hans'")
    text, messages = record.get("text"), record.get("messages")
    if (text is None) == (messages is None):
        raise MoescopeError(f"{where}: give exactly one of 'text' or 'messages'")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise MoescopeError(f"{where}: 'text' is empty")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise MoescopeError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise MoescopeError(f"{where}: every message needs string 'role' and 'content'")
        if not any(m["content"].strip() for m in messages):
            raise MoescopeError(f"{where}: all messages are empty")
    return Prompt(str(record["id"]), record["domain"], record["lang"], text, messages, record.get("expect"))


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line of a JSON Lines file; bad JSON names its line."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MoescopeError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
            yield number, record


def load_calibration(path: str | Path, domains: list[str] | None = None) -> list[Prompt]:
    """The prompts of a JSONL calibration file, in file order, optionally only some domains."""
    path = Path(path)
    if not path.is_file():
        raise MoescopeError(f"{path}: no such calibration file")
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        prompt = _parse(record, where)
        if prompt.id in first_line:
            raise MoescopeError(f"{where}: duplicate id {prompt.id!r} (first on line {first_line[prompt.id]})")
        first_line[prompt.id] = number
        prompts.append(prompt)
    if not prompts:
        raise MoescopeError(f"{path}: the calibration file has no prompts")
    if domains:
        present = sorted({p.domain for p in prompts})
        missing = [d for d in domains if d not in present]
        if missing:
            raise MoescopeError(f"{path}: no prompts in domain {', '.join(missing)}; it has {', '.join(present)}")
        prompts = [p for p in prompts if p.domain in domains]
    return prompts


def records_by_id(path: str | Path) -> dict[str, tuple[int, dict]]:
    """{id: (line number, JSON record)} of a file `load_calibration` has already validated, for the
    fields other formats add (probes' `expect`, multiple-choice items' `choices` and `answer`)."""
    records = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                records[str(record["id"])] = (number, record)
    return records


def render(prompt: Prompt, tokenizer) -> list[int]:
    """Token ids of a prompt: text as is (with the tokenizer's special tokens), a chat through the
    tokenizer's chat template, or as `role: content` lines when the tokenizer has no template.
    Callers cut the ids to the model's context themselves, so the tokenizer's own length warning is off."""
    if prompt.text is not None:
        return list(tokenizer(prompt.text, add_special_tokens=True, verbose=False)["input_ids"])
    messages = prompt.messages or []
    if getattr(tokenizer, "chat_template", None):
        open_turn = messages[-1]["role"] != "assistant"
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def encode(prompts: list[Prompt], tokenizer, max_tokens: int | None = None) -> list[Encoded]:
    """Tokenise every prompt, keeping at most `max_tokens` tokens (the first ones) of each."""
    encoded = []
    for prompt in prompts:
        ids = render(prompt, tokenizer)
        if not ids:
            raise MoescopeError(f"prompt {prompt.id!r} tokenises to nothing")
        capped = ids[:max_tokens] if max_tokens else ids
        encoded.append(Encoded(prompt, capped, len(capped) < len(ids)))
    return encoded


def batches(encoded: list[Encoded], batch_size: int) -> list[list[Encoded]]:
    """Consecutive groups of `batch_size` prompts, in file order."""
    return [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]


def padded(rows: list[list[int]], left: bool = False, pad_id: int = 0):
    """(ids, attention_mask) LongTensors for token lists of different lengths."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def token_stream(prompts: list[Prompt], tokenizer) -> list[int]:
    """Every prompt's tokens followed by the end-of-text token, in file order."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for prompt in prompts:
        ids += render(prompt, tokenizer) + ([eos] if eos is not None else [])
    return ids


def calibration_windows(path: str | Path, tokenizer, count: int, length: int):
    """Up to `count` windows [n, length] of a calibration set's token stream, spread evenly over the
    whole file so that every domain contributes (the file is usually grouped by domain). A set shorter
    than one window gives one window of all its tokens."""
    import torch

    ids = token_stream(load_calibration(path), tokenizer)
    if len(ids) < 2:
        raise MoescopeError(f"{path} has {len(ids)} tokens: a calibration set needs at least 2 to predict one")
    length = min(length, len(ids))
    count = min(count, len(ids) // length)
    stride = len(ids) // count
    return torch.tensor([ids[i * stride: i * stride + length] for i in range(count)], dtype=torch.long)
