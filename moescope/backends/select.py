"""Which backend a checkpoint or a loaded model belongs to, and the few calls that differ between them.

A checkpoint runs under `hf` (transformers) or `mlx` (mlx-lm); "auto" picks mlx for mlx-lm's converted
layout, which transformers cannot load, and hf for everything else. Loading, capturing routing and
listing the MoE layers differ per backend; everything else moescope does with a loaded model (the
profiling run, perplexity, the gate, the replay) works on either, because `backends.mlx` presents an
mlx-lm model through the slice of transformers' interface moescope uses. Backends are imported only
when asked for, so the hf path never imports mlx.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moescope.backends.hf.loading import Placement, load_model, model_identity
from moescope.checkpoints import check_checkpoint_dir, headers, read_config, read_header, shards
from moescope.errors import MoescopeError
from moescope.models.base import MoELayer
from moescope.models.layout import text_config
from moescope.models.mlx_layout import is_converted

BACKENDS = ("auto", "hf", "mlx")


def is_mlx_layout(model_dir: str | Path) -> bool:
    """Whether the checkpoint is in mlx-lm's converted layout (models.mlx_layout)."""
    path = check_checkpoint_dir(model_dir)
    metadata = read_header(path / shards(path)[0]).get("__metadata__")
    return is_converted(read_config(path), headers(path), metadata if isinstance(metadata, dict) else None)


def resolve_backend(model_dir: str | Path, backend: str = "auto") -> str:
    """"hf" or "mlx" for this checkpoint; MoescopeError for a backend that cannot load it."""
    if backend not in BACKENDS:
        raise MoescopeError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    converted = is_mlx_layout(model_dir)
    if backend == "hf" and converted:
        raise MoescopeError(f"{model_dir} is in mlx-lm's converted layout, which transformers cannot load: use "
                            "--backend mlx (or auto)")
    return backend if backend != "auto" else "mlx" if converted else "hf"


def open_model(model_dir: str | Path, backend: str = "auto", placement: Placement | None = None, *,
               dtype: str | None = None):
    """The checkpoint loaded by its backend (a transformers model, or a backends.mlx MlxCausalLM), placed
    as `placement` says (`dtype`, where given, overrides its dtype). Under mlx, `--device cpu` is mlx's
    CPU and `--device auto` its default device (the GPU on Apple Silicon); CUDA devices and
    `--max-memory` are transformers' alone."""
    placement = placement or Placement()
    placement = replace(placement, dtype=dtype) if dtype else placement
    if resolve_backend(model_dir, backend) == "hf":
        return load_model(model_dir, placement)
    from moescope.backends.mlx.loading import load_mlx_model

    if placement.device not in ("cpu", "auto") or placement.max_memory or placement.offload_to_disk:
        raise MoescopeError(f"the mlx backend runs on --device cpu or auto (mlx's default device), not "
                            f"--device {placement.device}{' with --max-memory' if placement.max_memory else ''}")
    return load_mlx_model(model_dir, placement.dtype, "cpu" if placement.device == "cpu" else None)


def is_mlx_model(model) -> bool:
    return getattr(model, "backend", None) == "mlx"


def routing_capture(model, *, distributions: bool = False, saliency: bool = False, on_event=None):
    """The capture context manager of the model's backend (RoutingEvents with torch tensors either way)."""
    if is_mlx_model(model):
        from moescope.backends.mlx.capture import capture_mlx_routing

        return capture_mlx_routing(model, distributions=distributions, saliency=saliency, on_event=on_event)
    from moescope.backends.hf.capture import capture_routing

    return capture_routing(model, distributions=distributions, saliency=saliency, on_event=on_event)


def model_layers(model) -> list[MoELayer]:
    """The MoE layers of a loaded model, as models.registry describes them."""
    if is_mlx_model(model):
        return model.moe_layers
    from moescope.models.registry import find_moe_layers

    return find_moe_layers(model)


def check_comparable(baseline, candidate) -> None:
    """Refuse a candidate that cannot be a compressed form of the baseline: another model type, other MoE
    layers or top-k, or another output vocabulary (KL and routing drift compare them token by token)."""
    sides = [(model_identity(m).model_type, [(x.index, x.top_k) for x in model_layers(m)],
              text_config(m.config).vocab_size) for m in (baseline, candidate)]
    for name, base, cand in zip(("model type", "MoE layers and top-k", "vocabulary size"), *sides):
        if base != cand:
            raise MoescopeError(f"the candidate is not a compressed form of the baseline: its {name} differs "
                                f"({base} vs {cand})")
