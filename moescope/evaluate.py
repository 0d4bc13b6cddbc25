"""Perplexity on the embedded held-out sets.

Kept small on purpose: the quality comparisons of compressed models (KL to the baseline, generation
checks) build on `perplexity` and `load_heldout` here.

Held-out format: ``assets/heldout/<domain>-<lang>.jsonl``, one record a line in the calibration
format (``id``, ``domain``, ``lang``, ``source`` and ``text`` or chat ``messages``). Records are
tokenised one by one, joined with the end-of-text token and cut into windows of the context length.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HELDOUT_DIR = Path(__file__).resolve().parent / "assets" / "heldout"


def load_heldout(directory: str | Path = HELDOUT_DIR, domain: str | None = None,
                 lang: str | None = None) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Held-out records grouped by (domain, lang), optionally filtered to one domain or language."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(Path(directory).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if (domain is None or rec["domain"] == domain) and (lang is None or rec["lang"] == lang):
                        out.setdefault((rec["domain"], rec["lang"]), []).append(rec)
    return out


def heldout_token_ids(tokenizer: Any, records: list[dict[str, Any]]) -> list[int]:
    """One token stream: each record (chat records through the chat template) then end-of-text."""
    ids: list[int] = []
    for rec in records:
        if "messages" in rec:
            text = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        else:
            text = rec["text"]
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def perplexity(model: Any, token_ids: Any, seq_len: int, batch_size: int = 8) -> float:
    """Token-level perplexity over non-overlapping windows of `seq_len` tokens.

    `token_ids` is a list of token lists (each cut into windows separately; a short tail is
    dropped) or a 2-D tensor whose rows are already windows. Every window is scored on its own,
    without context carried over, so the first token of each window is not predicted.
    """
    import torch

    if isinstance(token_ids, torch.Tensor):
        windows = token_ids.reshape(-1, token_ids.shape[-1]).long()
    else:
        rows = [seq[i:i + seq_len] for seq in token_ids for i in range(0, len(seq) - seq_len + 1, seq_len)]
        if not rows:
            raise ValueError(f"no sequence has {seq_len} tokens")
        windows = torch.tensor(rows, dtype=torch.long)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     batch[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += batch[:, 1:].numel()
    return math.exp(nll / count)
