"""Load a local Hugging Face checkpoint with transformers, place it on devices, and say which model it is.

Never downloads: a path that is not a local directory with a config.json is an error, not a hub id.

Every verb that runs a model takes the same three options (`commands.common.add_placement_arguments`)
and loads through `load_model(path, Placement)`, so `--device`, `--dtype` and `--max-memory` mean the
same everywhere:

- `--device cpu` (default), `cuda` (the current GPU), `cuda:N`: the whole model on that device.
- `--device auto`: accelerate's device map over every visible GPU, then the CPU; `--max-memory`
  caps each device (`0=70GiB,1=70GiB,cpu=200GiB`), and the word `disk` in it lets what does not fit
  go to a temporary folder on disk (put it elsewhere with TMPDIR). Without `disk`, limits that cannot
  hold the model are an error before any weight is read. Offloaded weights are brought onto the
  device layer by layer as the model runs (accelerate's hooks).
- `--dtype bfloat16|float16|float32`: the precision the weights are loaded and run at.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moescope.checkpoints import check_checkpoint_dir, headers, read_config
from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity, config_hash
from moescope.models.footprint import format_size
from moescope.models.layout import check_routing_config, text_config
from moescope.models.registry import find_moe_layers
from moescope.output import read_json

MODEL_DTYPES = ("bfloat16", "float16", "float32")
DEVICE_FORMS = "cpu, cuda, cuda:N or auto"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
DISK = "disk"


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


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a verb runs its model and at which precision (see the module docstring).

    max_memory: device (GPU index or "cpu") -> bytes, for `device="auto"`; `offload_to_disk` lets
    accelerate put what does not fit there into a temporary folder.
    """

    device: str = "cpu"
    dtype: str | None = None  # None: the checkpoint's own
    max_memory: dict[int | str, int] | None = None
    offload_to_disk: bool = False

    def check(self) -> Placement:
        """Self, after checking the device exists here and the options fit together; MoescopeError if not."""
        check_device(self.device)
        if self.dtype is not None and self.dtype not in MODEL_DTYPES:
            raise MoescopeError(f"--dtype {self.dtype}: give one of {', '.join(MODEL_DTYPES)}")
        if (self.max_memory is not None or self.offload_to_disk) and self.device != "auto":
            raise MoescopeError(f"--max-memory splits a model across devices: it needs --device auto, not "
                                f"--device {self.device}")
        for key in self.max_memory or {}:
            if isinstance(key, int):
                check_device(f"cuda:{key}", flag="--max-memory")
        return self


def check_device(device: str, flag: str = "--device") -> None:
    """MoescopeError unless `device` is one of DEVICE_FORMS and exists on this machine."""
    import torch

    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device in ("cpu", "auto"):
        return
    if match is None:
        raise MoescopeError(f"{flag} {device}: give {DEVICE_FORMS}")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise MoescopeError(f"{flag} {device}: {why} on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise MoescopeError(f"{flag} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def size_in_bytes(text: str) -> int | None:
    """Bytes in "70GiB", "500 MB", "1.5TiB" or "123456" (units in any case); None if `text` is no size."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    return int(float(match.group(1)) * SIZE_UNITS[unit]) if unit in SIZE_UNITS else None


def parse_max_memory(text: str) -> tuple[dict[int | str, int], bool]:
    """("0=70GiB,cpu=200GiB,disk") -> ({0: bytes, "cpu": bytes}, True): per-device caps, and whether
    the rest may go to disk."""
    limits: dict[int | str, int] = {}
    disk = False
    for part in (p.strip() for p in text.split(",")):
        key, _, size = part.partition("=")
        key = key.strip().lower()
        if key == DISK:
            disk = True
            continue
        if not size or not (key == "cpu" or key.isdigit()):
            raise MoescopeError(f"--max-memory {text!r}: write DEVICE=SIZE pairs, DEVICE a GPU index or cpu, "
                                "plus `disk` to allow offloading to disk, e.g. 0=70GiB,cpu=200GiB,disk")
        limit = size_in_bytes(size)
        if not limit:
            raise MoescopeError(f"--max-memory: {size!r} is not a size above zero; write e.g. 70GiB or 500MB")
        limits[int(key) if key.isdigit() else key] = limit
    return limits, disk


def device_map(path: Path, placement: Placement) -> dict[str, Any]:
    """accelerate's device map for `placement` (device "auto"), planned on the meta model; a
    MoescopeError when the limits cannot hold it and disk offload was not allowed."""
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    model = model_on_meta(path, placement.dtype)
    no_split = model._no_split_modules
    limits = get_balanced_memory(model, max_memory=placement.max_memory, no_split_module_classes=no_split)
    mapping = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split)
    if DISK in mapping.values() and not placement.offload_to_disk:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        caps = ", ".join(f"{k}={format_size(v)}" for k, v in (placement.max_memory or limits).items())
        raise MoescopeError(f"--max-memory {caps} cannot hold the model ({format_size(size)} of weights at "
                            f"{str(model.dtype).removeprefix('torch.')}, plus room for its largest layer): raise a "
                            "limit, or add `disk` to offload the rest to disk")
    return mapping


def load_model(path: str | Path, placement: Placement | None = None, *, dtype: str | None = None):
    """A transformers causal LM from a local directory, in eval mode, placed as `placement` says (`dtype`,
    where given, overrides its dtype), with the grouped_mm experts kernel (batched_mm is 8-30x slower
    on CPU). Safetensors only (a .bin checkpoint is a pickle that can run code), with every shard's
    header and the routing config checked first."""
    import torch
    from transformers import AutoModelForCausalLM

    placement = placement or Placement()
    placement = (dataclasses.replace(placement, dtype=dtype) if dtype else placement).check()
    path = check_checkpoint_dir(path)
    headers(path)
    check_routing_config(read_config(path), str(path / "config.json"))
    options: dict[str, Any] = {"dtype": getattr(torch, placement.dtype) if placement.dtype else "auto"}
    offload = None
    if placement.device == "auto":
        options["device_map"] = device_map(path, placement)
        if DISK in options["device_map"].values():
            offload = tempfile.TemporaryDirectory(prefix="moescope-offload-")
            options["offload_folder"] = offload.name
    elif placement.device != "cpu":
        options["device_map"] = placement.device
    with loading(path, "model"):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **options)
        except torch.cuda.OutOfMemoryError:
            raise MoescopeError(f"{path} does not fit on {placement.device} at {placement.dtype or 'its own dtype'}: "
                                "use --device auto with --max-memory, or a smaller --dtype") from None
    model._moescope_offload = offload  # the offload folder lives (and is removed) with the model
    return model.eval()


def input_device(model):
    """The device a forward call's inputs go to: the input embeddings' (accelerate's execution device
    where that layer's weights are offloaded and sit on the meta device)."""
    import torch

    if not hasattr(model, "get_input_embeddings"):  # another backend's model says where its inputs go
        return model.device
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embeddings.weight.device


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


def model_on_meta(model_dir: str | Path, dtype: str | None = None):
    """The model built from its config on the meta device (no weights read), at `dtype` (default: the
    checkpoint's own), to check a plan against or to plan where its weights go."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = check_checkpoint_dir(model_dir)
    check_routing_config(read_config(model_dir), str(model_dir / "config.json"))
    with loading(model_dir, "config"), torch.device("meta"):
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        stored = getattr(config, "dtype", None)
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if dtype else stored)
