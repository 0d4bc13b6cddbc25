"""Reading a local Hugging Face checkpoint directory: its shards, headers, tensors and metadata.

Never downloads: a path that is not a local directory with a config.json is an error, not a hub id.
Shard names come from `model.safetensors.index.json`, a file anyone can write, so each must be a
plain file name inside the checkpoint: a name with a directory part would make moescope read (and
write its pruned copy) outside the directories the user named. Headers are read with their length
checked against the file, so a crafted or truncated file is an error, not a huge allocation.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.output import decode_text, parse_json, read_json

INDEX_NAME = "model.safetensors.index.json"
METADATA_KEY = "moescope"
HEADER_LIMIT = 100 * 2**20  # safetensors itself refuses headers over 100 MB
# Bits per element of every dtype safetensors knows (its own list, 0.8).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


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
    config = read_json(path, "config")
    if not isinstance(config, dict):
        raise MoescopeError(f"{path} is not a JSON object; restore the checkpoint's config")
    return config


def shards(model_dir: Path) -> list[str]:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors file."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise MoescopeError(f"{index} is not a safetensors index (no \"weight_map\" object of tensor names and "
                                "shard files); restore it")
        names = set()
        for name in weight_map.values():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise MoescopeError(f"{index} names the shard {name!r}, which is not a file inside {model_dir}: "
                                    "refusing to read or write outside the checkpoint")
            if not (model_dir / name).is_file():
                raise MoescopeError(f"{index} names the shard {name}, which is missing from {model_dir}")
            names.add(name)
        return sorted(names)
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (f" (it has {bins[0]}: moescope reads safetensors only, because a .bin file is a pickle that can "
                "run code; convert it with transformers' save_pretrained(safe_serialization=True))") if bins else ""
        raise MoescopeError(f"{model_dir} has no .safetensors files{hint}")
    return files


def read_header(path: Path, fix: str = "re-save the checkpoint") -> dict:
    """Tensor name -> {dtype, shape, data_offsets} of one safetensors file, `__metadata__` included;
    a header that does not fit the file (its length, dtypes, shapes, offsets) is a MoescopeError
    ending in `fix`, never a huge allocation or a crash in safetensors."""
    size_on_disk = path.stat().st_size
    corrupt = f"{path} has a corrupt safetensors header"
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MoescopeError(f"{path} is not a safetensors file (too short); {fix}")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(HEADER_LIMIT, size_on_disk - 8):
            raise MoescopeError(f"{corrupt} (it claims {length} bytes in a file of {size_on_disk}); {fix}")
        try:
            header = parse_json(decode_text(handle.read(length), corrupt), corrupt)
        except MoescopeError as error:
            raise MoescopeError(f"{error}; {fix}") from None
    if not isinstance(header, dict):
        raise MoescopeError(f"{corrupt} (not a JSON object); {fix}")
    data_size = size_on_disk - 8 - length
    for name, info in header.items():
        fits = (isinstance(info, dict) and all(isinstance(v, str) for v in info.values()) if name == "__metadata__"
                else _entry_fits(info, data_size))
        if not fits:
            raise MoescopeError(f"{corrupt}: the entry {name!r} has an unknown dtype, a bad shape, or offsets that do "
                                f"not fit its size or the file (truncated or damaged); {fix}")
    position = 0  # the tensors must tile the data exactly, as safetensors requires (-1: they do not)
    for start, end in sorted(info["data_offsets"] for name, info in header.items() if name != "__metadata__"):
        position = end if start == position else -1
    if position != data_size:
        raise MoescopeError(f"{corrupt}: its tensors do not cover the file's data exactly (gaps, overlaps or extra "
                            f"bytes: truncated or damaged); {fix}")
    return header


def _entry_fits(info: object, data_size: int) -> bool:
    """Whether a header entry has a known dtype, a shape of counts, and offsets inside the data that
    span exactly the bytes its shape and dtype need."""
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BITS:
        return False
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not isinstance(shape, list)
            or not all(type(o) is int for o in offsets) or not all(type(d) is int and d >= 0 for d in shape)):
        return False
    start, end = offsets
    return 0 <= start <= end <= data_size and end - start == (math.prod(shape) * DTYPE_BITS[info["dtype"]] + 7) // 8


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
    metadata = parse_json((header.get("__metadata__") or {}).get(METADATA_KEY, "{}"),
                          f"{model_dir}: the moescope metadata in its first shard")
    if not isinstance(metadata, dict):
        raise MoescopeError(f"{model_dir}: the moescope metadata in its first shard is not a JSON object")
    return metadata
