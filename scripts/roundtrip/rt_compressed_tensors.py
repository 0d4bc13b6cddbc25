"""compressed-tensors for transformers: llm-compressor applies the `--target transformers` recipe (data-free
`oneshot`) and saves the checkpoint compressed; `AutoModelForCausalLM.from_pretrained` loads it back with
`CompressedTensorsConfig(dequantize=True)`, the way a user reads it in transformers. Its grid is moescope's
symmetric one, so every parameter must equal `quantize --plan`'s."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version

import torch
from common import TOKENIZER_FILES, Served, logits_of, parameters
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

NAME = "compressed-tensors"
EXPORT_ARGS = ["--format", "compressed-tensors", "--target", "transformers"]
EXPORT_FILE = "recipe.yaml"
LOGIT_BOUND = {"max_diff": 1e-4}  # the same weights in the same framework: equal up to kernel order


def versions(options) -> str:
    return ", ".join(f"{p} {version(p)}" for p in ("llmcompressor", "compressed-tensors", "transformers", "torch"))


def compress(case, recipe, out) -> list[str]:
    """llm-compressor's oneshot with the recipe, saved compressed; the config groups it saved, in words."""
    from llmcompressor import oneshot

    model = AutoModelForCausalLM.from_pretrained(case.model_dir, dtype=torch.float32)
    oneshot(model=model, recipe=str(recipe))
    model.save_pretrained(out, save_compressed=True)
    for name in TOKENIZER_FILES:
        shutil.copy(case.model_dir / name, out / name)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    return [f"saved {name}: {g['weights']['num_bits']} bits, {g['weights']['strategy']}"
            f"{' ' + str(g['weights']['group_size']) if g['weights'].get('group_size') else ''}, "
            f"{len(g['targets'])} targets ({g['targets'][0]}, ...)" for name, g in groups.items()]


def serve(case, work, export_file, coarse, windows, texts, options) -> Served:
    saved = work / "compressed"
    lines = compress(case, export_file, saved)
    loaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    return Served(parameters(loaded), logits_of(loaded, windows), lines=lines)
