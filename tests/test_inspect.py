"""`moescope inspect` reads structure from config.json and safetensors headers only."""

from __future__ import annotations

import json

import pytest

from moescope.commands.inspect import compact
from moescope.errors import MoescopeError
from moescope.models.inspection import inspect_checkpoint
from moescope.models.registry import find_moe_layers
from moescope.models.tiny import tiny_model


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe", "mixtral"])
def test_inspect_agrees_with_the_loaded_model(model_type, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    info = inspect_checkpoint(tmp_path)
    layers = find_moe_layers(model)
    assert info["moe_layers"] == [layer.index for layer in layers]
    assert set(info["experts_per_layer"].values()) == {layers[0].num_experts}
    assert info["top_k"] == layers[0].top_k
    assert info["router_family"] == layers[0].family.name
    assert info["renormalize"] == layers[0].renormalize
    assert info["params_total"] == sum(t.numel() for t in model.state_dict().values())  # buffers too
    assert info["params_in_experts"] == sum(layer.params_per_expert * layer.num_experts for layer in layers)
    assert info["shared_expert"] == layers[0].shared_expert


def test_cli_json_output(tmp_path, capsys):
    from moescope.cli import main

    tiny_model("olmoe").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "olmoe" and info["top_k"] == 2
    assert 0.5 < info["expert_share"] < 1


def test_dense_checkpoint_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(MoescopeError, match="no MoE layers found in llama"):
        inspect_checkpoint(tmp_path)


def test_missing_and_corrupt_inputs(tmp_path):
    with pytest.raises(MoescopeError, match="local checkpoints only; no downloads"):
        inspect_checkpoint(tmp_path / "Qwen/Qwen3-30B-A3B")
    with pytest.raises(MoescopeError, match="no config.json"):
        inspect_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with pytest.raises(MoescopeError, match="no .safetensors files"):
        inspect_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MoescopeError, match="corrupt safetensors header"):
        inspect_checkpoint(tmp_path)


def test_compact_ranges():
    assert compact([0, 1, 2, 5, 6, 9]) == "0-2, 5-6, 9"
