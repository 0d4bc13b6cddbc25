"""Write checkpoints: the one place a compressed model reaches the disk.

`rewrite_checkpoint` rewrites a safetensors checkpoint tensor by tensor, in its own on-disk key
layout (models.layout); `save_model_checkpoint` saves a model held in memory (a fake-quantised one).
Both follow the rules of moescope.output: the output is built in a temporary directory beside it and
renamed when complete (so a crash or a full disk never leaves something that looks finished), an
existing output is replaced only when the caller allows it and only if moescope wrote it, and the
source is never touched (an output may not be, hold or sit inside it).

Shards are rewritten one at a time (peak memory about one shard); tensors an edit does not touch are
written back byte for byte (bf16 included). config.json is edited as a JSON dict with its own key
names (re-serialising `model.config` would rename keys that other runtimes read, e.g. qwen3_moe's
`num_experts`), and every other file (tokenizer, generation config, chat template) is copied.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moescope.checkpoints import (
    INDEX_NAME,
    METADATA_KEY,
    check_checkpoint_dir,
    iter_tensors,
    read_config,
    read_header,
    read_metadata,
    shards,
)
from moescope.errors import MoescopeError
from moescope.output import OutputKind, atomic_directory

Edit = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")
PLAN_FILE = "bit_plan.json"  # what `moescope quantize` writes beside the weights


def written_by_moescope(directory: Path) -> bool:
    """A checkpoint moescope wrote: pruned ones record how in their shards' metadata, fake-quantised
    ones carry their bit plan. Only these may be replaced with --overwrite."""
    try:
        return (directory / PLAN_FILE).is_file() or bool(read_metadata(directory))
    except MoescopeError:
        return False


CHECKPOINT = OutputKind("checkpoint", directory=True, is_own=written_by_moescope)


def copy_other_files(source: Path, work: Path, config: dict) -> None:
    """config.json (as given, the source's own key names) and every non-weight file of the source."""
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json" and not any(path.match(p) for p in WEIGHT_FILES):
            shutil.copy2(path, work / path.name)


def rewrite_checkpoint(
    source: str | Path,
    out: str | Path,
    edit: Edit,
    *,
    config_edit: Callable[[dict], dict] | None = None,
    metadata: dict | None = None,
    description: str = "rewriting",
    overwrite: bool = False,
) -> Path:
    """Write `source` to `out` with `edit(name, tensor) -> [(name, tensor), ...]` applied to every tensor.

    An edit returns [] to drop a tensor, and may rename it. `metadata` (JSON-able) is stored in every
    shard's safetensors metadata under "moescope", so each output says how it was made.
    """
    source, out = check_checkpoint_dir(source), Path(out)
    names = shards(source)
    recorded = json.dumps(metadata or {}, sort_keys=True)
    with atomic_directory(out, CHECKPOINT, overwrite, sources=[source]) as work:
        weight_map, total_size = {}, 0
        for shard in tqdm(names, desc=description, unit="shard"):
            own = read_header(source / shard).get("__metadata__")
            own = own.get("format") if isinstance(own, dict) else None
            shard_meta = {"format": own if isinstance(own, str) else "pt", METADATA_KEY: recorded}  # mlx-lm: "mlx"
            tensors = {}
            for name, tensor in iter_tensors(source / shard):
                for new_name, new_tensor in edit(name, tensor):
                    tensors[new_name] = new_tensor.contiguous()
                    weight_map[new_name] = shard
                    total_size += new_tensor.numel() * new_tensor.element_size()
            save_file(tensors, str(work / shard), metadata=shard_meta)
            del tensors
        if (source / INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (work / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = read_config(source)
        copy_other_files(source, work, config_edit(config) if config_edit else config)
    return out


def save_model_checkpoint(model, source: str | Path, out: str | Path, extra: dict[str, str] | None = None,
                          overwrite: bool = False) -> Path:
    """Save `model` (transformers writes the experts back in the hub's per-expert layout) with the
    source's own config.json (its dtype updated), tokenizer and chat template, plus `extra` files
    (name -> text); the result loads everywhere the original did."""
    source, out = check_checkpoint_dir(source), Path(out)
    with atomic_directory(out, CHECKPOINT, overwrite, sources=[source]) as work:
        model.save_pretrained(work)
        config = read_config(source)
        dtype = str(model.dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        copy_other_files(source, work, config)
        for name, text in (extra or {}).items():
            (work / name).write_text(text)
    return out
