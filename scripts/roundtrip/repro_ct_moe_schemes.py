"""Minimal reproduction, for transformers' issue tracker: transformers decodes every fused MoE expert
tensor of a compressed-tensors checkpoint with ONE scheme, whatever scheme each layer was saved with.

    pip install torch==2.13.0 llmcompressor==0.14.0.1   # compressed-tensors 0.19.0, transformers 5.17.0
    python repro_ct_moe_schemes.py CASE OUT_DIR

No moescope: a random Qwen3-MoE (2 layers, 4 experts, hidden 64, expert size 32) is quantised with
llm-compressor (data-free `oneshot`), saved compressed, loaded back with `from_pretrained`, and each
fused expert tensor compared with what llm-compressor itself computed (`fake_quantize` with each
module's own scale and scheme).

CASE  per-layer-bits   layer 0's experts int4 group 32, layer 1's int8 group 32: loads with no error,
                       layer 1 decoded as int4 (wrong weights; exit 1)
      split-reverse    gate/up channel, down group 16: down decoded as channel (shape error; exit 2)
      uniform          every expert int4 group 32, one scheme: bit-exact (exit 0)

Cause (transformers 5.17, `quantizers/quantizer_compressed_tensors.py`; 5.24 moved it to
`quantizers/base.py`): `update_weight_conversions` gives every experts converter one decompression
step whose scheme is `integrations/compressed_tensors.py::get_experts_scheme(config)`, the first
config group with a `re:` target mentioning experts, resolved once for the whole model.
"""

from __future__ import annotations

import sys

import torch
import yaml
from transformers import AutoModelForCausalLM, Qwen3MoeConfig


def scheme(bits: int, strategy: str = "group", group: int = 32) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy}
    return weights | ({"group_size": group} if strategy == "group" else {})


def experts(layer: str, names: str = "[^.]+") -> str:
    return f"re:.*layers\\.{layer}\\.mlp\\.experts\\.\\d+\\.{names}$"


GROUPS = {
    "per-layer-bits": {"l0": {"targets": [experts("0")], "weights": scheme(4)},
                       "l1": {"targets": [experts("1")], "weights": scheme(8)}},
    "split-reverse": {"gu": {"targets": [experts("\\d+", "(gate|up)_proj")], "weights": scheme(4, "channel")},
                      "dn": {"targets": [experts("\\d+", "down_proj")], "weights": scheme(4, "group", 16)}},
    "uniform": {"all": {"targets": [experts("\\d+")], "weights": scheme(4)}},
}


def expected_experts(model) -> dict[str, torch.Tensor]:
    """llm-compressor's own dequantised expert weights, fused as transformers fuses them."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    def dequantised(linear):
        return fake_quantize(linear.weight, linear.weight_scale, getattr(linear, "weight_zero_point", None),
                             linear.quantization_scheme.weights)

    found = {}
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            rows = [e for e in module if hasattr(e, "down_proj")]
            found[f"{name}.gate_up_proj"] = torch.stack([torch.cat([dequantised(e.gate_proj),
                                                                    dequantised(e.up_proj)]) for e in rows])
            found[f"{name}.down_proj"] = torch.stack([dequantised(e.down_proj) for e in rows])
    return found


def reproduce(case: str, out: str) -> int:
    from llmcompressor import oneshot

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, vocab_size=128, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).to(torch.float32).save_pretrained(f"{out}.orig")
    model = AutoModelForCausalLM.from_pretrained(f"{out}.orig", dtype=torch.float32)
    recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "ignore": ["lm_head", "re:.*mlp\\.gate$"], "config_groups": GROUPS[case]}}}}
    with open(f"{out}.recipe.yaml", "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    oneshot(model=model, recipe=f"{out}.recipe.yaml")
    expected = expected_experts(model)
    model.save_pretrained(out, save_compressed=True)
    try:
        loaded = dict(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).named_parameters())
    except Exception as error:  # noqa: BLE001  (the loader's own error is the finding)
        print(f"{case}: from_pretrained raised {type(error).__name__}: {str(error)[:300]}")
        return 2
    wrong = 0
    for name, want in expected.items():
        got = loaded[name].detach()
        same = int((got == want).sum()) if got.shape == want.shape else 0
        print(f"{case}: {name}: {same}/{want.numel()} identical to llm-compressor's own dequantisation")
        wrong += same != want.numel()
    print(f"{case}: {'WRONG WEIGHTS, no error raised' if wrong else 'bit-exact'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(reproduce(sys.argv[1], sys.argv[2]))
