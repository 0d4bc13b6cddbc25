"""Exports parse in the structure each runtime expects, coarsening never loses bits in "up" mode and
reports every layer it changed, and bad plans are refused with one line."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import yaml
from safetensors import safe_open

from moescope.cli import main
from moescope.compress.export import coarsen, export, one_width
from moescope.compress.quant.apply import check_plan_file, uniform_plan
from moescope.compress.quant.memory import format_bytes, memory_estimate
from moescope.errors import MoescopeError
from moescope.models.tiny import tiny_model
from moescope.plans import BitPlan, save_bit_plan


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    model = tiny_model("qwen3_moe")
    model.save_pretrained(directory)
    return directory, model


def mixed_plan(model) -> BitPlan:
    plan = uniform_plan(model, 4)
    plan.layers[0] = [2, 2, 4, 4, 8, 8, 3, 3]  # mean 4.25
    plan.method = "budget"
    return plan


def test_one_width_rounds_as_documented():
    assert one_width([2, 4], "up") == 3 and one_width([2, 4], "down") == 3
    assert one_width([2, 2, 4, 8], "up") == 4 and one_width([2, 2, 4, 8], "down") == 4
    assert one_width([3, 4, 4, 8], "up") == 8 and one_width([3, 4, 4, 8], "down") == 4
    assert one_width([3, 4, 4, 8], "nearest") == 4  # mean 4.75
    assert one_width([4, 16], "up") == 16 and one_width([4, 16], "down") == 8


@pytest.mark.parametrize("mode", ["up", "nearest", "down"])
def test_coarsening_reports_every_changed_layer(checkpoint, mode):
    plan = mixed_plan(checkpoint[1])
    coarse, changes = coarsen(plan, mode)
    assert all(len(set(bits)) == 1 for bits in coarse.layers.values())
    assert [c.layer for c in changes] == [0]  # layer 1 was uniform already
    assert changes[0].planned == {2: 2, 3: 2, 4: 2, 8: 2}
    assert changes[0].experts_changed == sum(b != coarse.layers[0][0] for b in plan.layers[0])
    if mode == "up":
        assert coarse.average_bits() >= plan.average_bits() and coarse.layers[0][0] == 8
    if mode == "down":
        assert coarse.average_bits() <= plan.average_bits() and coarse.layers[0][0] == 4


@pytest.mark.parametrize("fmt", ["llama-cpp", "compressed-tensors", "mlx"])
def test_uniform_plan_exports_unchanged(checkpoint, tmp_path, fmt):
    plan = uniform_plan(checkpoint[1], 4)
    coarse, changes, notes = export(plan, fmt, tmp_path / "out")
    assert changes == [] and coarse.layers == plan.layers
    assert not any(note.startswith("layer ") for note in notes) and (tmp_path / "out").stat().st_size > 0


def llama_cpp_rules(path) -> list[tuple[str, str]]:
    """The rules as llama-quantize's parse_tensor_type_file reads them: every whitespace-separated word is
    NAME=TYPE, split at the first "="."""
    rules = [tuple(word.split("=", 1)) for word in path.read_text().split()]
    assert all(len(rule) == 2 and rule[0] and rule[1] for rule in rules)
    return rules


def llama_cpp_type(rules: list[tuple[str, str]], tensor: str) -> str | None:
    """The type llama-quantize gives `tensor`: that of the first rule whose regex it contains."""
    return next((ggml for pattern, ggml in rules if re.search(pattern, tensor)), None)


@pytest.mark.parametrize("other_bits", [16, 4])
def test_llama_cpp_tensor_type_file(checkpoint, tmp_path, other_bits):
    """Checked against a real llama-quantize once (docs/quantization.md); here against its matching rule."""
    plan = mixed_plan(checkpoint[1])
    plan.non_expert_bits = other_bits
    export(plan, "llama-cpp", tmp_path / "types.txt")
    rules = llama_cpp_rules(tmp_path / "types.txt")
    assert {ggml for _, ggml in rules} <= {"q2_K", "q3_K", "q4_K", "q8_0", "bf16"}
    other = "bf16" if other_bits == 16 else "q4_K"
    expected = {f"blk.{layer}.ffn_{proj}_exps.weight": ggml for layer, ggml in ((0, "q8_0"), (1, "q4_K"))
                for proj in ("gate", "up", "down")}
    expected |= {"token_embd.weight": "bf16", "output.weight": "bf16", "blk.1.attn_output.weight": other,
                 "blk.0.attn_q.weight": other, "blk.0.ffn_down_shexp.weight": other,
                 "blk.10.ffn_down_exps.weight": other}  # layer 1's rule does not reach layer 10
    assert {tensor: llama_cpp_type(rules, tensor) for tensor in expected} == expected
    notes = (tmp_path / "types.txt.notes.txt").read_text()
    assert "layer 0: 2 at 2, 2 at 3, 2 at 4, 2 at 8 bits -> all at 8 (6 experts changed)" in notes
    assert "layer 1:" not in notes
    # llama-quantize applies the rules only when its positional type is a quantised one
    command = re.search(r"llama-quantize --tensor-type-file types\.txt \S+ \S+ (\S+)", notes)
    assert command and command[1] == ("Q8_0" if other_bits == 16 else "Q4_K")


def test_llama_cpp_names_the_tensors_that_get_a_fallback_type(checkpoint, tmp_path, capsys):
    """k-quants need rows of 256 weights: the tiny model's experts (rows of 64 and 32) get llama-quantize's
    32-block fallback, q8_0's rows fit, and a model whose rows are multiples of 256 gets no note."""
    directory, model = checkpoint
    plan = mixed_plan(model)  # layer 0 coarsened to 8 bits (q8_0), layer 1 at 4 bits (q4_K)
    save_bit_plan(plan, tmp_path / "plan.json")
    args = ["export", str(tmp_path / "plan.json"), "--format", "llama-cpp", "--out", str(tmp_path / "t.txt")]
    assert main([*args, "--model", str(directory)]) == 0
    out = capsys.readouterr().out
    assert ("llama.cpp fallback: layer 1: gate_up_proj (rows of 64), down_proj (rows of 32) not a multiple of "
            "256: llama-quantize stores them as q5_0, not q4_K") in out
    assert "layer 0:" not in out.split("llama.cpp fallback:", 1)[1]
    assert "llama.cpp fallback:" in (tmp_path / "t.txt.notes.txt").read_text()
    # ggml's own sizes: q8_0 is 8.5 bits per weight, layer 1's q5_0 fallback 5.5 (block scales included)
    experts = 8 * (2 * 32 * 64 + 64 * 32) * (8.5 + 5.5) / 8
    rest = memory_estimate(model, plan)  # attention at bf16 and everything else as the plan counts it
    assert f"llama.cpp packed size: {format_bytes(experts + rest.non_expert_bytes + rest.other_bytes)}" in out
    assert f"(experts {format_bytes(experts)}, other linear " in out
    plan.non_expert_bits = 4  # attention's rows of 64 are no whole q4_K block either
    notes = export(plan, "llama-cpp", tmp_path / "t4.txt", model=model)[2]
    assert any(n.startswith("llama.cpp fallback: 8 other linear layers (model.layers.0.self_attn.q_proj, ...)")
               and n.endswith("stores them as q5_0, not q4_K") for n in notes)
    assert main([*args, "--overwrite"]) == 0 and "fallback" not in capsys.readouterr().out  # no --model: no shapes
    wide = tiny_model("qwen3_moe", hidden_size=256, moe_intermediate_size=256, intermediate_size=256,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    assert not [n for n in export(uniform_plan(wide, 3), "llama-cpp", tmp_path / "w.txt", model=wide)[2]
                if n.startswith("llama.cpp fallback")]


def test_compressed_tensors_recipe_targets_expert_linears(checkpoint, tmp_path):
    directory, model = checkpoint
    plan = mixed_plan(model)
    plan.layers[1] = [16] * 8  # left unquantised: ignored, not targeted
    export(plan, "compressed-tensors", tmp_path / "recipe.yaml")
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    modifier = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    (name, group), = modifier["config_groups"].items()
    assert name == "experts_8bit"
    assert group["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group",
                                "group_size": plan.group_size}
    with safe_open(directory / "model.safetensors", "pt") as f:
        modules = sorted({key.removesuffix(".weight") for key in f.keys()})

    def matched(patterns: list[str]) -> set[str]:
        regexes = [re.compile(p.removeprefix("re:")) for p in patterns if p.startswith("re:")]
        return {m for m in modules if m in patterns or any(r.match(m) for r in regexes)}

    experts0 = {m for m in modules if m.startswith("model.layers.0.mlp.experts.")}
    assert matched(group["targets"]) == experts0 and len(experts0) == 24
    assert "model.layers.0.mlp.gate" in matched(modifier["ignore"])
    assert {m for m in modules if m.startswith("model.layers.1.mlp.experts.")} <= matched(modifier["ignore"])
    assert not matched(group["targets"]) & {m for m in modules if "self_attn" in m or "shared" in m}


def test_compressed_tensors_recipe_fits_each_module_input_size(checkpoint, tmp_path, capsys):
    """llm-compressor requires the group size to divide a module's input: with the checkpoint, modules
    with fewer inputs than a group (the tiny model's down_proj, 32) get the channel strategy, as
    moescope's quantiser treats them (one short group per row); a size it cannot divide is refused.
    A real llm-compressor run on the demo model gave weights identical to `quantize --plan`
    (docs/quantization.md)."""
    directory, model = checkpoint
    plan = mixed_plan(model)
    plan.group_size = 64
    export(plan, "compressed-tensors", tmp_path / "recipe.yaml", model=model, model_dir=directory)
    groups = yaml.safe_load((tmp_path / "recipe.yaml").read_text())["quant_stage"]["quant_modifiers"][
        "QuantizationModifier"]["config_groups"]
    with safe_open(directory / "model.safetensors", "pt") as f:
        inputs = {key.removesuffix(".weight"): f.get_slice(key).get_shape()[1] for key in f.keys()
                  if ".experts." in key}
    strategy_of = {}
    for group in groups.values():
        regexes = [re.compile(t.removeprefix("re:")) for t in group["targets"]]
        for module in inputs:
            if any(r.match(module) for r in regexes):
                assert module not in strategy_of  # each module in exactly one group
                strategy_of[module] = (group["weights"]["strategy"], group["weights"]["num_bits"])
    assert set(strategy_of) == set(inputs)
    for module, (strategy, bits) in strategy_of.items():
        assert strategy == ("group" if inputs[module] % 64 == 0 else "channel")
        assert bits == (8 if ".layers.0." in module else 4)
    assert {s for s, _ in strategy_of.values()} == {"group", "channel"}

    plan.group_size = 48  # does not divide the 64 inputs of gate_proj and up_proj
    save_bit_plan(plan, tmp_path / "plan48.json")
    out = tmp_path / "r48.yaml"
    assert main(["export", str(tmp_path / "plan48.json"), "--format", "compressed-tensors", "--out", str(out),
                 "--model", str(directory)]) == 2
    err = capsys.readouterr().err
    assert "not a multiple of the group size 48" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_compressed_tensors_asymmetric_plan_says_its_grid_differs(checkpoint, tmp_path):
    plan = mixed_plan(checkpoint[1])
    plan.symmetric = False
    notes = export(plan, "compressed-tensors", tmp_path / "recipe.yaml")[2]
    assert any("stretches each group's range to include 0" in note for note in notes)
    plan.symmetric = True
    assert not any("include 0" in note for note in export(plan, "compressed-tensors", tmp_path / "r.yaml")[2])


def test_mse_scales_export_as_each_runtime_can_serve_them(checkpoint, tmp_path):
    plan = mixed_plan(checkpoint[1])
    plan.scales = "mse"
    coarse, _, notes = export(plan, "compressed-tensors", tmp_path / "recipe.yaml")
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    groups = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["config_groups"]
    assert {g["weights"]["observer"] for g in groups.values()} == {"mse"}
    assert {g["weights"]["observer_kwargs"]["maxshrink"] for g in groups.values()} == {0.6}
    assert coarse.scales == "mse" and any("observer" in note for note in notes)
    coarse, _, notes = export(plan, "mlx", tmp_path / "predicate.py")
    assert coarse.scales == "mlx" and any("was symmetric, mse" in note for note in notes)
    coarse, _, notes = export(plan, "llama-cpp", tmp_path / "types.txt")
    assert coarse.scales == "mse" and any("mse scales do not apply" in note for note in notes)


def test_mlx_predicate_is_callable_on_module_paths(checkpoint, tmp_path):
    plan = mixed_plan(checkpoint[1])
    plan.non_expert_bits = 8
    coarse, _, notes = export(plan, "mlx", tmp_path / "predicate.py")
    assert coarse.symmetric is False and coarse.scales == "mlx"  # MLX is affine only, with its own rule
    assert any("reproduces the weights mlx-lm serves" in note for note in notes)
    spec = importlib.util.spec_from_file_location("predicate", tmp_path / "predicate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Linear:  # what MLX passes: quantisable layers have to_quantized and a weight, norms and containers not
        def __init__(self, inputs: int = 256):
            self.weight = np.zeros((2, 4, inputs))  # SwitchLinear: [experts, out, in]

        def to_quantized(self, group_size, bits):
            return self

    def predicate(path: str):
        return module.quant_predicate(path, Linear())  # newer mlx-lm: no config argument

    assert predicate("model.layers.0.mlp.switch_mlp.down_proj") == {"bits": 8, "group_size": 128}
    assert predicate("model.layers.1.mlp.switch_mlp.gate_proj") == {"bits": 4, "group_size": 128}
    assert module.quant_predicate("model.layers.1.self_attn.q_proj", Linear(), {}) == {"bits": 8, "group_size": 128}
    assert predicate("model.layers.0.mlp.gate") is False and predicate("model.layers.0.mlp.router") is False
    assert predicate("model.layers.1.mlp.experts.gate_proj") == {"bits": 4, "group_size": 128}  # gpt-oss naming
    assert predicate("model.layers.1.mlp.shared_expert.up_proj") == {"bits": 8, "group_size": 128}  # not routed
    assert predicate("model.embed_tokens") is False and predicate("lm_head") is False
    assert module.quant_predicate("model.layers.0.input_layernorm", object()) is False
    assert module.quant_predicate("model.layers.0.mlp.switch_mlp.up_proj", Linear(inputs=192)) is False  # 1.5 groups
    # fewer inputs than a group: one group per row, as moescope quantises such a row
    assert module.quant_predicate("model.layers.0.mlp.switch_mlp.down_proj", Linear(inputs=64)) == {
        "bits": 8, "group_size": 64}
    assert "q_group_size=32" in (tmp_path / "predicate.py").read_text()  # mlx-lm's pre-filter lets them through


def test_mlx_names_the_matrices_it_leaves_unquantised(tmp_path):
    model = tiny_model("qwen3_moe", moe_intermediate_size=48)  # down_proj: 48 inputs, not a group MLX has
    notes = export(uniform_plan(model, 4), "mlx", tmp_path / "p.py", model=model)[2]
    assert [n for n in notes if n.startswith("mlx fallback:")] == [
        f"mlx fallback: layer {i}: down_proj (48 inputs) do not split into groups of 128: mlx-lm leaves them "
        "unquantised" for i in (0, 1)]
    notes = export(uniform_plan(tiny_model("qwen3_moe"), 4), "mlx", tmp_path / "q.py", model=tiny_model("qwen3_moe"))[2]
    assert not [n for n in notes if n.startswith("mlx fallback:")]  # 64 and 32 inputs: one group per row


def test_cli_writes_export_and_coarsened_plan(checkpoint, tmp_path, capsys):
    directory, model = checkpoint
    save_bit_plan(mixed_plan(model), tmp_path / "plan.json")
    args = ["export", str(tmp_path / "plan.json"), "--format", "mlx", "--out", str(tmp_path / "p.py"),
            "--coarsened-plan", str(tmp_path / "coarse.json"), "--model", str(directory)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "planned average 4.125" in out and "exported 6.000" in out and "layer 0: 2 at 2, 2 at 3" in out
    assert re.search(r"planned: packed size .* at 4\.12 average bits", out)
    assert re.search(r"exported: packed size .* at 6\.00 average bits", out)
    assert "# layer 0: 2 at 2" in (tmp_path / "p.py").read_text()
    coarse = check_plan_file(tmp_path / "coarse.json", model)
    assert coarse.layers == {0: [8] * 8, 1: [4] * 8} and coarse.source["coarsen"] == "up" and not coarse.symmetric


def test_bad_input_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    directory, model = checkpoint
    other = tmp_path / "other"
    tiny_model("qwen3_moe", num_hidden_layers=3).save_pretrained(other)
    save_bit_plan(mixed_plan(model), tmp_path / "plan.json")
    base = ["export", str(tmp_path / "plan.json"), "--format", "llama-cpp", "--out", str(tmp_path / "t.txt")]
    assert main(base + ["--model", str(other)]) == 2
    assert "bit plan is for another model" in capsys.readouterr().err and not (tmp_path / "t.txt").exists()
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["export", str(tmp_path / "bad.json"), "--format", "mlx", "--out", str(tmp_path / "p.py")]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    data = mixed_plan(model).to_dict()
    data["layers"]["1"][3] = 5
    (tmp_path / "five.json").write_text(json.dumps(data))
    assert main(["export", str(tmp_path / "five.json"), "--format", "mlx", "--out", str(tmp_path / "p.py")]) == 2
    err = capsys.readouterr().err
    assert "layer 1 expert 3" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "p.py").exists()
    with pytest.raises(MoescopeError, match="--format"):
        export(mixed_plan(model), "gguf", tmp_path / "x")
    assert main(base + ["--coarsen", "sideways"]) == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err
