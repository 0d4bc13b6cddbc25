"""compressed-tensors for vLLM, without vLLM: its wheels are CUDA builds, and a GPU with vLLM is not
something every machine running this has. llm-compressor applies the `--target vllm` recipe and saves
the checkpoint compressed; then

- the saved config is read the way vLLM 0.33's `CompressedTensorsMoEMethod.get_moe_method` reads it for
  each MoE layer (ignored -> unquantised; else the first config group whose target matches expert 0's
  gate_proj, up_proj and down_proj, a `Linear` target standing for the routed experts too): the three
  must be one scheme, at the plan's width, with a group size that divides the hidden and expert sizes;
- every expert module is decoded with its own config group (compressed-tensors' own decompressor) and
  must equal `quantize --plan`'s weights bit for bit.

What is not checked here: vLLM's kernels (Marlin, Triton, Humming) and its logits.
"""

from __future__ import annotations

import json
import re

import torch
from common import Served
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from rt_compressed_tensors import compress, versions  # noqa: F401  (versions: the same packages)
from safetensors.torch import load_file

NAME = "compressed-tensors-vllm"
EXPORT_ARGS = ["--format", "compressed-tensors", "--target", "vllm"]
EXPORT_FILE = "recipe.yaml"
LOGIT_BOUND: dict = {}
EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def matches(target: str, name: str) -> bool:
    return target == name or (target.startswith("re:") and re.match(target[3:], name) is not None)


class SavedConfig:
    """A saved checkpoint's quantization_config, looked up as vLLM does."""

    def __init__(self, directory):
        config = json.loads((directory / "config.json").read_text())
        self.hidden, self.inter = config["hidden_size"], config["moe_intermediate_size"]
        quantization = config["quantization_config"]
        self.format, self.ignore = quantization["format"], quantization.get("ignore") or []
        self.groups = [(group["targets"], QuantizationScheme.model_validate(group))
                       for group in quantization["config_groups"].values()]

    def scheme(self, module: str) -> QuantizationScheme | None:
        if any(matches(t, module) for t in self.ignore):
            return None
        named = next((s for targets, s in self.groups if any(matches(t, module) for t in targets)), None)
        return named or next((s for targets, s in self.groups if "Linear" in targets), None)

    def layer_problems(self, layer: int, bits: int) -> list[str]:
        """What vLLM would refuse, or load at another width than the plan's, for one MoE layer."""
        schemes = [self.scheme(f"model.layers.{layer}.mlp.experts.0.{p}") for p in ("gate_proj", "up_proj",
                                                                                  "down_proj")]
        weights = [s.weights.model_dump() if s else None for s in schemes]
        if any(w != weights[0] for w in weights):
            return [f"model.layers.{layer}.mlp.experts: vLLM refuses the layer: gate, up and down schemes differ"]
        args = schemes[0].weights if schemes[0] else None
        served = args.num_bits if args else 16
        problems = [] if served == bits else [f"model.layers.{layer}.mlp.experts: vLLM loads {served} bits, the "
                                              f"plan says {bits}"]
        if args and args.strategy == "group" and (self.hidden % args.group_size or self.inter % args.group_size):
            problems.append(f"model.layers.{layer}.mlp.experts: group size {args.group_size} does not divide the "
                            f"hidden size {self.hidden} and the expert size {self.inter} (vLLM refuses it)")
        if args and not args.symmetric and args.num_bits != 4:
            problems.append(f"model.layers.{layer}.mlp.experts: asymmetric {args.num_bits} bits")
        return problems


def decoded(directory, saved: SavedConfig) -> dict[str, torch.Tensor]:
    """Every expert module decoded with its own scheme, fused as transformers names them (gate and up stacked
    into gate_up_proj [E, 2I, H], down_proj [E, H, I]); unquantised layers as stored."""
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state |= load_file(path)
    modules: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for module in sorted({key.rsplit(".", 1)[0] for key in state}):
        match = EXPERT.match(module)
        if not match:
            continue
        tensors = {key[len(module) + 1:]: value for key, value in state.items() if key.startswith(module + ".")}
        scheme = saved.scheme(module)
        weight = (BaseCompressor.get_value_from_registry(scheme.format or saved.format).decompress(tensors, scheme)[
            "weight"] if "weight_packed" in tensors else tensors["weight"])
        modules.setdefault((match[1], match[4]), {})[int(match[3])] = weight.float()
    stacked = {key: torch.stack([experts[e] for e in sorted(experts)]) for key, experts in modules.items()}
    fused = {}
    for prefix in sorted({p for p, _ in modules}):
        fused[f"{prefix}.gate_up_proj"] = torch.cat([stacked[(prefix, "gate_proj")], stacked[(prefix, "up_proj")]], 1)
        fused[f"{prefix}.down_proj"] = stacked[(prefix, "down_proj")]
    return fused


def serve(case, work, export_file, coarse, windows, texts, options) -> Served:
    saved_dir = work / "compressed"
    lines = compress(case, export_file, saved_dir)
    saved = SavedConfig(saved_dir)
    weights = decoded(saved_dir, saved)

    def structure(plan) -> list[str]:
        return [p for layer, bits in sorted(plan.layers.items()) for p in saved.layer_problems(layer, bits[0])]

    return Served(weights, None, compare=[{"names": sorted(weights)}], structure=structure,
                  lines=[*lines, f"decoded {len(weights)} fused expert tensors module by module, each with its own "
                         "scheme; vLLM itself not run (needs a GPU)"])
