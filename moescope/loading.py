"""Load a local Hugging Face checkpoint. Never downloads: a path that is not a local directory
with a config.json is an error, not a hub id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError


def check_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory as a Path, or a MoescopeError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise MoescopeError(f"{path} does not exist: moescope loads local checkpoints only; no downloads")
    if not (path / "config.json").is_file():
        raise MoescopeError(f"{path} has no config.json: give the directory of a Hugging Face checkpoint")
    return path


def load_model(path: str | Path, dtype: str | None = None, device_map: str | None = None):
    """A transformers causal LM from a local directory, in eval mode, with the grouped_mm experts
    kernel (batched_mm is 8-30x slower on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_checkpoint_dir(path)
    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, device_map=device_map, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise MoescopeError(f"could not load {path}: {str(error).splitlines()[0]}") from None
    return model.eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_checkpoint_dir(path), local_files_only=True)


def _tokenizer_parts(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: data.get(key) for key in ("normalizer", "pre_tokenizer", "model", "added_tokens")}


def check_same_tokenizer(base_dir: Path, candidate_dir: Path, base_tok, candidate_tok) -> None:
    """Refuse a candidate whose tokenizer differs from the baseline's: KL compares distributions over
    the same token ids, and the same text must become the same tokens."""
    a, b = base_tok.get_vocab(), candidate_tok.get_vocab()
    why = None
    if len(a) != len(b):
        why = f"vocabulary sizes differ ({len(a)} vs {len(b)})"
    elif a != b:
        token = min(t for t in a if a[t] != b.get(t))
        why = f"token {token!r} has id {a[token]} in the baseline and {b.get(token)} in the candidate"
    else:
        pa, pb = _tokenizer_parts(base_dir), _tokenizer_parts(candidate_dir)
        differ = [key for key in pa if pb and pa[key] != pb[key]]
        if differ:
            why = f"tokenizer.json differs in {', '.join(differ)} (same vocabulary, different tokenisation)"
    if why:
        raise MoescopeError(f"the baseline and candidate tokenizers differ: {why}; comparisons need the same "
                            "token ids, so give the candidate the baseline's tokenizer files")


def prompt_room(config, new_tokens: int, flag: str) -> int | None:
    """How many tokens a prompt may have so that it and `new_tokens` more fit the model's context
    (None when the config states no context); `flag` names the option that asked for the new tokens."""
    from moescope.models import text_config

    context = getattr(text_config(config), "max_position_embeddings", None)
    if not context:
        return None
    if context - new_tokens < 1:
        raise MoescopeError(f"{flag} {new_tokens} leaves no room for a prompt in the model's context of "
                            f"{context} tokens")
    return context - new_tokens
