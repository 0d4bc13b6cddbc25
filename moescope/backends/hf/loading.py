"""Load a local Hugging Face checkpoint with transformers, and say which model it is.

Never downloads: a path that is not a local directory with a config.json is an error, not a hub id.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moescope.checkpoints import check_checkpoint_dir, headers, read_config
from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity, config_hash
from moescope.models.layout import check_routing_config, text_config
from moescope.models.registry import find_moe_layers
from moescope.output import read_json

DTYPE_NAMES = ("bfloat16", "float16", "float32")


@contextmanager
def loading(path: Path, what: str) -> Iterator[None]:
    """Turn any failure of transformers to read `what` from `path` (a config value of the wrong type, a
    damaged tokenizer file, ...) into one MoescopeError: the checkpoint is the user's input."""
    try:
        yield
    except (MoescopeError, MemoryError):
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MoescopeError(f"could not load the {what} in {path}: {first}") from None


def torch_dtype(name: str | None):
    """The torch dtype called `name` ("auto", the checkpoint's own, for None)."""
    import torch

    if name is None:
        return "auto"
    if name not in DTYPE_NAMES:
        raise MoescopeError(f"--dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def check_device(device: str | None) -> None:
    """Refuse a device torch does not know, or one this machine does not have, before loading anything."""
    import torch

    if device in (None, "auto"):
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise MoescopeError(f"--device {device!r} is not a device: use cpu, cuda, cuda:1, mps or auto") from None
    backend = getattr(torch, parsed.type, None)
    if parsed.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise MoescopeError(f"--device {device}: torch sees no {parsed.type} device on this machine; use --device cpu")
    count = getattr(backend, "device_count", None) if parsed.type != "cpu" else None
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise MoescopeError(f"--device {device}: this machine has {count()} {parsed.type} device(s)")


def load_model(path: str | Path, dtype: str | None = None, device_map: str | None = None):
    """A transformers causal LM from a local directory, in eval mode, with the grouped_mm experts
    kernel (batched_mm is 8-30x slower on CPU). Safetensors only (a .bin checkpoint is a pickle that
    can run code), with every shard's header and the routing config checked first."""
    from transformers import AutoModelForCausalLM

    path = check_checkpoint_dir(path)
    headers(path)
    check_routing_config(read_config(path), str(path / "config.json"))
    check_device(device_map)
    with loading(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), device_map=device_map,
                                                     local_files_only=True)
    return model.eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = check_checkpoint_dir(path)
    with loading(path, "tokenizer"):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _tokenizer_parts(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer.json"
    if not path.is_file():
        return {}
    data = read_json(path, "tokenizer")
    if not isinstance(data, dict):
        raise MoescopeError(f"{path} is not a tokenizer (not a JSON object); restore the checkpoint's tokenizer")
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


def check_comparable(baseline, candidate) -> None:
    """Refuse a candidate that cannot be a compressed form of the baseline: another model type, other MoE
    layers or top-k, or another output vocabulary (KL and routing drift compare them token by token)."""
    sides = [(model_identity(m).model_type, [(x.index, x.top_k) for x in find_moe_layers(m)],
              text_config(m.config).vocab_size) for m in (baseline, candidate)]
    for name, base, cand in zip(("model type", "MoE layers and top-k", "vocabulary size"), *sides):
        if base != cand:
            raise MoescopeError(f"the candidate is not a compressed form of the baseline: its {name} differs "
                                f"({base} vs {cand})")


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

    model_dir = check_checkpoint_dir(model_dir)
    check_routing_config(read_config(model_dir), str(model_dir / "config.json"))
    with loading(model_dir, "config"), torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
