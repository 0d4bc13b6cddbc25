"""MLX: mlx-lm's own converter with the exported predicate, loaded with `mlx_lm.load`.

The model is converted in float32, where MLX's grid is moescope's `--scales mlx` bit for bit (the export's
coarsened plan uses it): every weight must be identical. It is converted in bf16 too, where MLX also rounds
each group's scale and bias to bf16 and moescope only the weights: there the experts are compared by
error against `quantize --plan --dtype bfloat16` (at most BF16_ERROR_RATIO times the plan's) and the share
of identical weights is printed.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import version

import mlx.core as mx
import numpy as np
import torch
from common import Served, parameters, reference, transformers_model
from mlx_lm import convert, load

from moescope.judge.roundtrip import RoundTrip

NAME = "mlx"
EXPORT_ARGS = ["--format", "mlx"]
EXPORT_FILE = "predicate.py"
LOGIT_BOUND = {"max_diff": 1e-3}  # the same weights in float32; MLX's and torch's kernels sum in other orders
# bf16 scales and biases add error of about one 8-bit step: measured up to 2.3 times the plan's at 8 bits, 1.0 at
# 2-4 bits (docs/quantization.md); a layer at another width is off by a factor of 100 or more
BF16_ERROR_RATIO = 3.0


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


def converted(case, work, predicate, dtype: str):
    out = work / f"mlx-model-{dtype}"
    convert(str(case.model_dir), mlx_path=str(out), quantize=True, q_group_size=32, dtype=dtype,
            quant_predicate=predicate.quant_predicate)
    return load(str(out))[0]


def bf16_comparison(case, work, predicate) -> RoundTrip:
    """The experts of the bf16 conversion against `quantize --plan --dtype bfloat16`, by error."""
    loaded = hf_weights(converted(case, work, predicate, "bfloat16"))
    plan_weights = parameters(transformers_model(reference(case, work / "coarse.json", work / "reference-bf16",
                                                           "bfloat16")))
    original = parameters(transformers_model(case.model_dir))
    trip = RoundTrip("mlx in bf16 against quantize --plan --dtype bfloat16")
    trip.compare_weights(loaded, plan_weights, [n for n in plan_weights if ".experts." in n],
                         {n: w.bfloat16().float() for n, w in original.items()}, BF16_ERROR_RATIO)
    return trip


def serve(case, work, export_file, coarse, windows, texts, options) -> Served:
    spec = importlib.util.spec_from_file_location("predicate", export_file)
    predicate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predicate)
    model = converted(case, work, predicate, "float32")
    logits = np.concatenate([np.array(model(mx.array(windows[i:i + 4].numpy())).astype(mx.float32))
                             for i in range(0, len(windows), 4)])
    experts = {int(name.split(".")[2]): getattr(module, "bits", 16) for name, module in model.named_modules()
               if name.endswith("switch_mlp.down_proj")}

    def structure(plan) -> list[str]:
        return [f"model.layers.{layer}.mlp.switch_mlp: {bits} bits, the plan says {plan.layers[layer][0]}"
                for layer, bits in sorted(experts.items()) if bits != plan.layers[layer][0]]

    bf16 = bf16_comparison(case, work, predicate)
    identical = sum(t.identical for t in bf16.tensors) / sum(t.total for t in bf16.tensors)
    ratios = ", ".join(f"{t.name.split('.')[2]}:{t.error_ratio:.2f}" for t in bf16.tensors
                       if t.name.endswith("down_proj"))
    served = ", ".join(f"layer {layer} at {bits}" for layer, bits in sorted(experts.items()))
    return Served(hf_weights(model), torch.from_numpy(logits), structure=structure, problems=bf16.failures(),
                  lines=[f"mlx-lm serves the experts of {served} bits",
                         f"{bf16.summary()}; {100 * identical:.1f} % of the expert weights identical, max |diff| "
                         f"{max(t.max_diff for t in bf16.tensors):.3g}; down_proj error ratio per layer {ratios}"])
