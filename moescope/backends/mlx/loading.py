"""Load a local checkpoint with mlx-lm as an `MlxCausalLM`: the HF layout or mlx-lm's converted layout,
quantised or not.

What the model is comes from the checkpoint's transformers config, built on the meta device (no
weights read): its MoE layers, their router family, expert count and top-k (models.registry) and its
identity. So a profile made under MLX describes its layers exactly as a torch profile of the same
checkpoint does, and plans made from either apply to both. The config mlx-lm reads gets the hub's key
names back where transformers 5 renamed them (models.mlx_layout); the checkpoint is never modified.

On the CPU, mlx 0.32's `gather_mm` (unquantised experts) runs in float32 only, so non-float32
unquantised experts compute in float32 there, with the result cast back (what Metal's bfloat16
kernel does anyway); quantised experts (`gather_qmm`) run in every dtype.
"""

from __future__ import annotations

import re
from pathlib import Path

from moescope.backends.mlx.model import MlxCausalLM, SwitchBlock
from moescope.checkpoints import check_checkpoint_dir, read_config, shards
from moescope.errors import MoescopeError
from moescope.models.base import MoELayer
from moescope.models.mlx_layout import SWITCH_NAMES, packed_switches, with_hub_keys, without_mlx_keys
from moescope.models.registry import ROUTER_NAMES, find_moe_layers

INSTALL_HINT = "pip install 'moescope[mlx]' (mlx and mlx-lm)"
DEVICES = ("cpu", "gpu")


def mlx_installed() -> bool:
    """Whether the moescope[mlx] extra is installed (nothing imported)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("mlx", "mlx_lm"))


def require_mlx() -> None:
    """MoescopeError naming the extra when mlx or mlx-lm is not installed."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as error:
        missing = (error.name or "mlx").split(".")[0]
        raise MoescopeError(f"the MLX backend needs the moescope[mlx] extra ({missing} is not installed): "
                            f"{INSTALL_HINT}") from None


def transformers_config(path: Path, config: dict):
    """The transformers config of a config.json dict, without what mlx-lm's conversion added to it."""
    from transformers import AutoConfig

    plain = without_mlx_keys(config)
    try:
        hf_config = AutoConfig.for_model(**plain)
    except (ValueError, KeyError, TypeError) as error:
        raise MoescopeError(f"{path}: transformers does not know model_type {plain.get('model_type')!r} "
                            f"({str(error).splitlines()[0][:160]}); moescope reads a model's MoE layers from its "
                            "transformers config") from None
    hf_config._name_or_path = str(path)
    return hf_config


def meta_moe_layers(hf_config) -> list[MoELayer]:
    """The MoE layers of the model `hf_config` describes, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return find_moe_layers(AutoModelForCausalLM.from_config(hf_config))


def mlx_lm_model(path: Path, config: dict, lazy: bool = False):
    """The mlx-lm module for a checkpoint, with the hub's config key names added (weights read when first
    used with `lazy`) and per-expert widths rebuilt (backends.mlx.packed); one-line errors for a family
    mlx-lm does not implement, a config without keys it needs, and weights it cannot place."""
    import mlx_lm
    from mlx_lm.utils import load_model

    fixed = with_hub_keys(config)
    model_type = fixed.get("model_type")
    hook = {}
    if packed_switches(config, f"{path}/config.json"):  # per-expert widths: split the switches before loading
        from moescope.backends.mlx.packed import model_classes

        hook["get_model_classes"] = model_classes
    try:
        added = {k: v for k, v in fixed.items() if k not in config or config[k] != v}
        module, _ = load_model(path, lazy=lazy, model_config=added, **hook)
    except ValueError as error:
        first = str(error).splitlines()[0]
        if first.startswith("Model type"):
            raise MoescopeError(f"mlx-lm {mlx_lm.__version__} does not implement model_type {model_type!r}: "
                                "use --backend hf") from None
        raise MoescopeError(f"mlx-lm cannot load {path} as model_type {model_type!r}: {first[:200]}") from None
    except TypeError as error:
        missing = re.findall(r"'(\w+)'", str(error))
        raise MoescopeError(f"{path}/config.json lacks keys mlx-lm needs for model_type {model_type!r}: "
                            f"{', '.join(missing) or str(error)[:200]}; add them (the hub config of the model "
                            "has them)") from None
    return module


def switch_blocks(module) -> list[SwitchBlock]:
    """Every mlx-lm block with a SwitchGLU / SwitchMLP child (or moescope's PackedSwitch), in layer order."""
    from moescope.backends.mlx.packed import SWITCH_TYPES, PackedSwitch  # imports mlx: after require_mlx

    blocks = []
    for path, block in module.named_modules():
        switch = next((block[n] for n in SWITCH_NAMES if isinstance(block.get(n), (*SWITCH_TYPES, PackedSwitch))),
                      None)
        if switch is None:
            continue
        router = next((block[n] for n in ROUTER_NAMES if n in block and callable(block[n])), None)
        match = re.search(r"layers\.(\d+)\.", f"{path}.")
        blocks.append(SwitchBlock(int(match[1]) if match else len(blocks), path, block, switch, router))
    return sorted(blocks, key=lambda b: b.index)


def compute_experts_in_float32(module) -> int:
    """On the CPU, make every non-float32 unquantised expert layer compute in float32; returns how many."""
    import mlx.core as mx
    from mlx_lm.models.switch_layers import SwitchLinear

    def float32_call(self, x, indices, sorted_indices=False):
        weight = self["weight"].astype(mx.float32).swapaxes(-1, -2)
        out = mx.gather_mm(x.astype(mx.float32), weight, rhs_indices=indices, sorted_indices=sorted_indices)
        out = out.astype(x.dtype)
        return out + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else out

    if mx.default_device() != mx.cpu:
        return 0
    swapped = 0
    for _, layer in module.named_modules():
        if type(layer) is SwitchLinear and layer["weight"].dtype != mx.float32:
            layer.__class__ = type("Float32SwitchLinear", (SwitchLinear,), {"__call__": float32_call})
            swapped += 1
    return swapped


def load_mlx_model(path: str | Path, dtype: str | None = None, device: str | None = None) -> MlxCausalLM:
    """A checkpoint loaded with mlx-lm (see the module docstring); `dtype` casts the floating weights
    (scales of quantised layers included), `device` is cpu or gpu (default: mlx's own default)."""
    path = check_checkpoint_dir(path)
    shards(path)  # safetensors only, with a clear error otherwise
    require_mlx()
    import mlx.core as mx

    if device is not None:
        if device not in DEVICES:
            raise MoescopeError(f"--device {device!r}: the MLX backend runs on {' or '.join(DEVICES)}")
        mx.set_default_device(getattr(mx, device))
    config = read_config(path)
    hf_config = transformers_config(path, config)
    layers = meta_moe_layers(hf_config)
    module = mlx_lm_model(path, config)
    blocks = switch_blocks(module)
    if not blocks:
        raise MoescopeError(f"mlx-lm's model for model_type {config.get('model_type')!r} has no MoE layers (no "
                            "SwitchGLU or SwitchMLP), so it has no routing to capture: use --backend hf")
    if [b.index for b in blocks] != [layer.index for layer in layers]:
        raise MoescopeError(f"mlx-lm has MoE blocks in layers {[b.index for b in blocks]}, the transformers config "
                            f"in layers {[layer.index for layer in layers]}: they are not the same model")
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise MoescopeError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
        module.set_dtype(getattr(mx, dtype))
    compute_experts_in_float32(module)
    return MlxCausalLM(module, hf_config, layers, blocks, generation_config(path))


def load(path: str | Path):
    """(model, tokenizer) of a local checkpoint, as `mlx_lm.load` returns them, for every layout moescope reads
    or writes: the Hugging Face layout, mlx-lm's converted layout and per-expert widths (`moescope quantize
    --backend mlx --per-expert`, which stock mlx-lm cannot open). This is `moescope.load`:

        model, tokenizer = moescope.load("Qwen3-30B-A3B-per-expert")
        mlx_lm.generate(model, tokenizer, prompt="Explain MoE routing.")
    """
    path = check_checkpoint_dir(path)
    require_mlx()
    from mlx_lm.utils import load_tokenizer

    config = read_config(path)
    module = mlx_lm_model(path, config)
    compute_experts_in_float32(module)
    return module, load_tokenizer(path, eos_token_ids=with_hub_keys(config).get("eos_token_id"))


def generation_config(path: Path):
    """transformers' GenerationConfig of the checkpoint (its end-of-text ids), None without one."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None
