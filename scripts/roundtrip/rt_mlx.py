"""MLX: mlx-lm's own converter with the exported predicate, loaded with `mlx_lm.load`.

The model is converted in float32, where MLX's grid is moescope's `--scales mlx` bit for bit (the export's
coarsened plan uses it): every weight must be identical. In bf16, MLX also rounds each group's scale and
bias to bf16 (docs/quantization.md), so only float32 is compared exactly.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import version

import mlx.core as mx
import numpy as np
import torch
from common import Served
from mlx_lm import convert, load

NAME = "mlx"
EXPORT_ARGS = ["--format", "mlx"]
EXPORT_FILE = "predicate.py"
LOGIT_BOUND = {"max_diff": 1e-3}  # the same weights in float32; MLX's and torch's kernels sum in other orders


def versions(options) -> str:
    return f"mlx {version('mlx')}, mlx-lm {version('mlx-lm')}"


def dequantised(module) -> mx.array:
    """A module's weight as MLX computes with it: dequantised where the module is quantised."""
    if hasattr(module, "scales"):
        return mx.dequantize(module.weight, module.scales, getattr(module, "biases", None), module.group_size,
                             module.bits, mode=getattr(module, "mode", "affine"))
    return module.weight


def hf_weights(model) -> dict[str, torch.Tensor]:
    """Every weight of the loaded model under transformers' names (mlx-lm keeps them, except the experts:
    `switch_mlp.{gate,up,down}_proj` [E, out, in] are transformers' fused `experts.gate_up_proj` and
    `experts.down_proj`)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module.get("weight"), mx.array):
            found[f"{name}.weight"] = torch.from_numpy(np.array(dequantised(module).astype(mx.float32)))
    for key in [k for k in found if ".switch_mlp.gate_proj." in k]:
        prefix = key.split(".switch_mlp.")[0]
        gate, up = found.pop(key), found.pop(f"{prefix}.switch_mlp.up_proj.weight")
        found[f"{prefix}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        found[f"{prefix}.experts.down_proj"] = found.pop(f"{prefix}.switch_mlp.down_proj.weight")
    return found


def serve(case, work, export_file, coarse, windows, texts, options) -> Served:
    spec = importlib.util.spec_from_file_location("predicate", export_file)
    predicate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predicate)
    converted = work / "mlx-model"
    convert(str(case.model_dir), mlx_path=str(converted), quantize=True, q_group_size=32, dtype="float32",
            quant_predicate=predicate.quant_predicate)
    model, _ = load(str(converted))
    logits = np.concatenate([np.array(model(mx.array(windows[i:i + 4].numpy())).astype(mx.float32))
                             for i in range(0, len(windows), 4)])
    experts = {int(name.split(".")[2]): getattr(module, "bits", 16) for name, module in model.named_modules()
               if name.endswith("switch_mlp.down_proj")}

    def structure(plan) -> list[str]:
        return [f"model.layers.{layer}.mlp.switch_mlp: {bits} bits, the plan says {plan.layers[layer][0]}"
                for layer, bits in sorted(experts.items()) if bits != plan.layers[layer][0]]

    served = ", ".join(f"layer {layer} at {bits}" for layer, bits in sorted(experts.items()))
    return Served(hf_weights(model), torch.from_numpy(logits), structure=structure,
                  lines=[f"mlx-lm serves the experts of {served} bits"])
