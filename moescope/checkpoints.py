"""Reading a local Hugging Face checkpoint directory: its shards, headers, tensors and metadata.

Never downloads: a path that is not a local directory with a config.json is an error, not a hub id.
Shard names come from `model.safetensors.index.json`, a file anyone can write, so each must be a
plain file name inside the checkpoint: a name with a directory part would make moescope read (and
write its pruned copy) outside the directories the user named. Headers are read with their length
checked against the file, so a crafted or truncated file is an error, not a huge allocation.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from moescope.errors import MoescopeError

INDEX_NAME = "model.safetensors.index.json"
METADATA_KEY = "moescope"
HEADER_LIMIT = 100 * 2**20  # safetensors itself refuses headers over 100 MB


def check_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory as a Path, or a MoescopeError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise MoescopeError(f"{path} does not exist: moescope loads local checkpoints only; no downloads")
    if not (path / "config.json").is_file():
        raise MoescopeError(f"{path} has no config.json: give the directory of a Hugging Face checkpoint")
    return path


def read_config(model_dir: Path) -> dict:
    """config.json as a dict (the checkpoint's own key names)."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoescopeError(f"{path} is not valid JSON ({error}); restore the checkpoint's config") from None
    if not isinstance(config, dict):
        raise MoescopeError(f"{path} is not a JSON object; restore the checkpoint's config")
    return config


def shards(model_dir: Path) -> list[str]:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors file."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise MoescopeError(f"{index} is not a safetensors index ({error!r}); restore it") from None
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise MoescopeError(f"{index} names the shard {name!r}, which is not a file inside {model_dir}: "
                                    "refusing to read or write outside the checkpoint")
            if not (model_dir / name).is_file():
                raise MoescopeError(f"{index} names the shard {name}, which is missing from {model_dir}")
        return sorted(names)
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (f" (it has {bins[0]}: moescope reads safetensors only, because a .bin file is a pickle that can "
                "run code; convert it with transformers' save_pretrained(safe_serialization=True))") if bins else ""
        raise MoescopeError(f"{model_dir} has no .safetensors files{hint}")
    return files


def read_header(path: Path) -> dict:
    """Tensor name -> {dtype, shape, data_offsets} of one safetensors file, `__metadata__` included;
    a file whose header or data offsets do not fit the file is a MoescopeError."""
    size_on_disk = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MoescopeError(f"{path} is not a safetensors file (too short); re-save the checkpoint")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(HEADER_LIMIT, size_on_disk - 8):
            raise MoescopeError(f"{path} has a corrupt safetensors header (it claims {length} bytes in a file of "
                                f"{size_on_disk}); re-save the checkpoint")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise MoescopeError(f"{path} has a corrupt safetensors header; re-save the checkpoint") from None
    if not isinstance(header, dict):
        raise MoescopeError(f"{path} has a corrupt safetensors header; re-save the checkpoint")
    data_size = size_on_disk - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size or not isinstance(shape, list)
                or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise MoescopeError(f"{path}: tensor {name!r} has a corrupt entry in the header (offsets outside the "
                                "file, or a bad shape); the file is truncated or damaged, re-save the checkpoint")
    return header


def headers(model_dir: Path) -> dict[str, dict]:
    """Every tensor's header entry across the checkpoint's shards, weights never read."""
    tensors: dict[str, dict] = {}
    for shard in shards(model_dir):
        tensors.update({k: v for k, v in read_header(model_dir / shard).items() if k != "__metadata__"})
    return tensors


def shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the headers only."""
    return {name: tuple(info["shape"]) for name, info in headers(model_dir).items()}


def iter_tensors(path: Path) -> Iterator[tuple[str, object]]:
    """(name, torch tensor) of every tensor of one shard, in the file's order."""
    from safetensors import SafetensorError, safe_open

    read_header(path)  # a clear error for a damaged file before safetensors' own
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    except SafetensorError as error:
        raise MoescopeError(f"{path} cannot be read ({error}); re-save the checkpoint") from None


def read_metadata(model_dir: str | Path) -> dict:
    """The moescope metadata recorded in a rewritten checkpoint ({} if none)."""
    model_dir = Path(model_dir)
    header = read_header(model_dir / shards(model_dir)[0])
    text = (header.get("__metadata__") or {}).get(METADATA_KEY, "{}")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise MoescopeError(f"{model_dir}: the moescope metadata in its first shard is not JSON") from None
