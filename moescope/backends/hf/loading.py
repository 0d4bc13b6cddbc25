"""Load a local Hugging Face checkpoint with transformers, and say which model it is.

Never downloads: a path that is not a local directory with a config.json is an error, not a hub id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moescope.checkpoints import check_checkpoint_dir, shards
from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity, config_hash
from moescope.models.layout import text_config
from moescope.models.registry import find_moe_layers


def load_model(path: str | Path, dtype: str | None = None, device_map: str | None = None):
    """A transformers causal LM from a local directory, in eval mode, with the grouped_mm experts
    kernel (batched_mm is 8-30x slower on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_checkpoint_dir(path)
    shards(path)  # safetensors only: a .bin checkpoint is a pickle that can run code
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


def eos_ids(model, tokenizer) -> list[int]:
    """The end-of-text token ids a generation stops at: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def model_identity(model) -> ModelIdentity:
    """The identity a profile or plan made on `model` records."""
    return ModelIdentity(text_config(model.config).model_type, config_hash(model.config.to_dict()),
                         str(getattr(model.config, "_name_or_path", "") or ""))


def describe_layers(model) -> list[dict]:
    """Each MoE layer's description (`MoELayer.describe`), in forward order, as a profile records them."""
    return [layer.describe() for layer in find_moe_layers(model)]


def model_on_meta(model_dir: str | Path):
    """The model built from its config on the meta device (no weights read), to check a plan against."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(check_checkpoint_dir(model_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
