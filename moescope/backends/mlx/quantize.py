"""Quantise a checkpoint for real with mlx-lm, module by module as a predicate says, and save its weights.

mlx-lm asks the predicate (`predicate(path, module)`, the one `moescope export --format mlx` writes)
about every module with a `to_quantized` whose inputs are a multiple of 32 (the default group size
passed here, so the predicate can give each module its own group size of 32, 64 or 128); a dict of
bits and group size quantises it, False leaves it as it is. Weights are written by mlx-lm's
`save_model` (mlx arrays straight to safetensors: bfloat16 kept bit for bit, never through numpy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moescope.backends.mlx.loading import mlx_lm_model, require_mlx
from moescope.checkpoints import read_config
from moescope.models.mlx_layout import with_hub_keys

PREDICATE_GROUP_SIZE = 32  # mlx-lm skips modules whose inputs are not a multiple of this before asking


def save_quantised(source: Path, out: Path, predicate: Callable) -> dict:
    """Quantise `source` as `predicate` says and save the weights into the directory `out`; returns the
    `quantization` entry mlx-lm's loader reads from config.json (defaults plus one entry per module)."""
    require_mlx()
    from mlx_lm.utils import quantize_model, save_model

    config = read_config(source)
    module = mlx_lm_model(source, config, lazy=True)
    module, quantised = quantize_model(module, with_hub_keys(config), PREDICATE_GROUP_SIZE, 4,
                                       quant_predicate=predicate)
    save_model(out, module)
    return quantised["quantization"]
