"""Load a local Hugging Face checkpoint. Never downloads: a path that is not a local directory
with a config.json is an error, not a hub id."""

from __future__ import annotations

from pathlib import Path

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
