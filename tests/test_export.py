"""Exports parse in the structure each runtime expects, coarsening never loses bits in "up" mode and
reports every layer it changed, and bad plans are refused with one line."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors import safe_open

from moescope.cli import main
from moescope.compress.export import coarsen, export, one_width
from moescope.compress.export.compressed_tensors import fitting_group, strategy
from moescope.compress.export.llama_cpp import CONVERTER, gguf_commands
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


@pytest.mark.parametrize("fmt,target", [("llama-cpp", None), ("compressed-tensors", "transformers"),
                                        ("compressed-tensors", "vllm"), ("mlx", None)])
def test_uniform_plan_exports_unchanged(checkpoint, tmp_path, fmt, target):
    plan = uniform_plan(checkpoint[1], 4)
    coarse, changes, notes = export(plan, fmt, tmp_path / "out", model=checkpoint[1], target=target)
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
                 "blk.10.ffn_down_exps.weight": other,  # layer 1's rule does not reach layer 10
                 "blk.1.ffn_gate_up_exps.weight": "q4_K"}  # what converters that fuse gate and up write
    assert {tensor: llama_cpp_type(rules, tensor) for tensor in expected} == expected
    notes = (tmp_path / "types.txt.notes.txt").read_text()
    assert "layer 0: 2 at 2, 2 at 3, 2 at 4, 2 at 8 bits -> all at 8 (6 experts changed)" in notes
    assert "layer 1:" not in notes
    # llama-quantize applies the rules only when its positional type is a quantised one
    command = re.search(r"llama-quantize --tensor-type-file \S*types\.txt \S+ \S+ (\S+)", notes)
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


def recipe_groups(path) -> tuple[dict, list[str]]:
    modifier = yaml.safe_load(path.read_text())["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    return modifier["config_groups"], modifier["ignore"]


def checkpoint_modules(directory) -> list[str]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return sorted({key.removesuffix(".weight") for key in f.keys()})


def matched(patterns: list[str], modules: list[str]) -> set[str]:
    """The modules llm-compressor's targets select: exact names and `re:` regexes (re.match)."""
    regexes = [re.compile(p.removeprefix("re:")) for p in patterns if p.startswith("re:")]
    return {m for m in modules if m in patterns or any(r.match(m) for r in regexes)}


def test_compressed_tensors_for_transformers_is_one_scheme_for_every_expert(checkpoint, tmp_path):
    """transformers decodes every fused expert tensor with the first experts scheme it finds: the recipe
    has exactly one experts group, over every expert of every layer, at the whole model's one width."""
    directory, model = checkpoint
    plan = mixed_plan(model)  # layer 0 mixed (mean 4.25), layer 1 at 4: 4.125 over the model
    coarse, changes, notes = export(plan, "compressed-tensors", tmp_path / "r.yaml", "nearest", model, directory,
                                    "transformers")
    assert coarse.layers == {0: [4] * 8, 1: [4] * 8} and [c.layer for c in changes] == [0]
    coarse, changes, _ = export(plan, "compressed-tensors", tmp_path / "r.yaml", "up", model, directory, "transformers")
    assert coarse.layers == {0: [8] * 8, 1: [8] * 8} and [c.layer for c in changes] == [0, 1]  # layer 1 was uniform
    assert coarse.source["one_width"] == "model"
    groups, ignore = recipe_groups(tmp_path / "r.yaml")
    (name, group), = groups.items()
    modules = checkpoint_modules(directory)
    experts = {m for m in modules if ".mlp.experts." in m}
    assert name == "experts_8bit" and matched(group["targets"], modules) == experts and len(experts) == 48
    # the tiny model's expert inputs are 64 (gate, up) and 32 (down): a group of 128 is one per row everywhere
    assert group["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    assert "model.layers.0.mlp.gate" in matched(ignore, modules) and not matched(ignore, modules) & experts
    assert any(n.startswith("loader: transformers") and "get_experts_scheme" in n for n in notes)


def test_compressed_tensors_for_vllm_gives_each_layer_one_scheme(checkpoint, tmp_path):
    """vLLM takes a scheme per MoE layer but refuses a layer whose gate, up and down differ: each layer is
    one target of one group, whatever its projections' input sizes; a 16-bit layer is ignored."""
    directory, model = checkpoint
    plan = mixed_plan(model)
    plan.layers[1] = [16] * 8
    plan.non_expert_bits = 8
    plan.group_size = 32  # divides every input (64, 32, and attention's): group strategy
    coarse, _, notes = export(plan, "compressed-tensors", tmp_path / "r.yaml", model=model, target="vllm")
    assert coarse.layers == {0: [8] * 8, 1: [16] * 8}
    groups, ignore = recipe_groups(tmp_path / "r.yaml")
    modules = checkpoint_modules(directory)
    assert set(groups) == {"experts_8bit", "other_8bit"} and groups["other_8bit"]["targets"] == ["Linear"]
    layer0 = {m for m in modules if m.startswith("model.layers.0.mlp.experts.")}
    layer1 = {m for m in modules if m.startswith("model.layers.1.mlp.experts.")}
    assert groups["experts_8bit"]["targets"] == ["re:.*layers\\.0\\.[^.]+\\.experts\\.\\d+\\.[^.]+$"]
    assert matched(groups["experts_8bit"]["targets"], modules) == layer0
    assert layer1 <= matched(ignore, modules)
    assert {g["weights"]["strategy"] for g in groups.values()} == {"group"}
    assert {g["weights"]["group_size"] for g in groups.values()} == {32}
    assert any("CompressedTensorsMoEMethod.get_moe_method" in n for n in notes)
    assert any("no Marlin kernel" in n and "here 64" in n for n in notes)  # hidden 64: not a multiple of 128
    plan.layers[0] = [2] * 8
    notes = export(plan, "compressed-tensors", tmp_path / "r2.yaml", model=model, target="vllm")[2]
    assert any(n.startswith("loader: layers 0 at 2 or 3 bits run only on vLLM's Humming kernels") for n in notes)


def test_group_size_fits_every_input_with_one_strategy():
    assert fitting_group(128, {128, 64}) == 128 and strategy(128, {128, 64}) == "channel"  # the demo model
    assert fitting_group(64, {128, 64}) == 64 and strategy(64, {128, 64}) == "group"
    assert fitting_group(128, {256, 192}) == 64 and strategy(64, {256, 192}) == "group"  # 128 does not divide 192
    assert fitting_group(48, {64, 32}) == 32
    assert fitting_group(128, {200, 140}) == 200 and strategy(200, {200, 140}) == "channel"  # no group of 32 or more


def test_compressed_tensors_changes_what_the_loader_cannot_decode(checkpoint, tmp_path, capsys):
    """A group size that fits no input one way becomes one that does, an asymmetric plan symmetric, and
    each change is printed; a plan transformers cannot load at all is refused in one line."""
    directory, model = checkpoint
    plan = mixed_plan(model)
    plan.group_size, plan.symmetric = 48, False  # 48 neither divides 64 nor covers it
    save_bit_plan(plan, tmp_path / "plan.json")
    args = ["export", str(tmp_path / "plan.json"), "--format", "compressed-tensors", "--out", str(tmp_path / "r.yaml"),
            "--model", str(directory), "--coarsened-plan", str(tmp_path / "coarse.json")]
    assert main([*args, "--target", "vllm"]) == 0
    coarse = check_plan_file(tmp_path / "coarse.json", model)
    assert coarse.group_size == 32 and coarse.symmetric
    text = (tmp_path / "r.yaml").read_text()
    assert "# group size 48 -> 32" in text and "# asymmetric -> symmetric" in text
    groups, _ = recipe_groups(tmp_path / "r.yaml")
    assert {(g["weights"]["strategy"], g["weights"]["group_size"]) for g in groups.values()} == {("group", 32)}
    assert "loader: vLLM" in capsys.readouterr().out

    plan.layers = {0: [16] * 8, 1: [16] * 8}  # transformers cannot leave MoE layers unquantised
    save_bit_plan(plan, tmp_path / "plan16.json")
    out = tmp_path / "r16.yaml"
    args16 = ["export", str(tmp_path / "plan16.json"), "--format", "compressed-tensors", "--out", str(out),
              "--model", str(directory), "--target"]
    assert main([*args16, "transformers"]) == 2
    err = capsys.readouterr().err
    assert "rounds up to none of the widths this target loads (2, 3, 4, 8)" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert main([*args16, "vllm"]) == 0 and "experts_" not in out.read_text()  # vLLM leaves them unquantised


def test_compressed_tensors_needs_a_loader_and_the_model(checkpoint, tmp_path, capsys):
    directory, model = checkpoint
    save_bit_plan(mixed_plan(model), tmp_path / "plan.json")
    base = ["export", str(tmp_path / "plan.json"), "--out", str(tmp_path / "r.yaml")]
    for extra, message in (([], "needs --target transformers or vllm"), (["--target", "vllm"], "needs --model"),
                           (["--target", "vllm", "--format", "mlx", "--model", str(directory)],
                            "--format mlx has one loader")):
        fmt = [] if "--format" in extra else ["--format", "compressed-tensors"]
        assert main([*base, *fmt, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.yaml").exists()


def test_mse_scales_export_as_each_runtime_can_serve_them(checkpoint, tmp_path):
    plan = mixed_plan(checkpoint[1])
    plan.scales = "mse"
    coarse, _, notes = export(plan, "compressed-tensors", tmp_path / "recipe.yaml", model=checkpoint[1], target="vllm")
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


def test_llama_cpp_notes_give_the_commands_from_checkpoint_to_perplexity(checkpoint, tmp_path):
    """The notes hold the three commands `make check-exports` runs (convert through moescope's wrapper, which
    takes tokenizers llama.cpp does not recognise; llama-quantize; llama-perplexity with --no-repack)."""
    directory, model = checkpoint
    coarse = export(mixed_plan(model), "llama-cpp", tmp_path / "types.txt", model=model, model_dir=directory)[0]
    notes = (tmp_path / "types.txt.notes.txt").read_text()
    steps = gguf_commands(coarse, tmp_path / "types.txt", directory, outtype="f32")
    assert all(shlex.join(step) in notes for step in steps.values())  # f32: the checkpoint's own dtype
    assert steps["convert"][1] == str(CONVERTER) and CONVERTER.is_file()
    assert steps["quantize"][-1] == "Q8_0" and steps["perplexity"][-1] == "--no-repack"
    # run by path with llama.cpp's Python, so it must not need moescope
    tree = ast.parse(CONVERTER.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name and name.startswith("moescope")}
    done = subprocess.run([sys.executable, "-I", str(CONVERTER), "--llama-cpp", str(tmp_path), str(directory)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "has no convert_hf_to_gguf.py" in done.stderr
