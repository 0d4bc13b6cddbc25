"""What mlx-lm needs from a checkpoint and what moescope says when it is missing: the hub's config key
names (added, never replacing, without changing the model's identity), the converted layout found by
itself, and one line with exit status 2 for mlx not installed, a family mlx-lm does not implement and
a converted config without the keys mlx-lm needs."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import tiny_checkpoint, write_calibration
from transformers import AutoConfig

from moescope.backends.select import is_mlx_layout, resolve_backend
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.identity import config_hash
from moescope.models.mlx_layout import is_converted, with_hub_keys, without_mlx_keys
from moescope.models.tiny import tiny_config


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "qwen3_next", "glm4_moe", "mixtral"])
def test_hub_keys_are_added_without_changing_the_identity(model_type):
    saved = tiny_config(model_type).to_dict()  # the names transformers 5 writes
    fixed = with_hub_keys(saved)
    assert {k: v for k, v in fixed.items() if k in saved} == saved  # nothing replaced
    rope = saved["rope_parameters"]
    assert fixed["rope_theta"] == rope["rope_theta"]
    assert fixed.get("partial_rotary_factor") == rope.get("partial_rotary_factor")
    if model_type.startswith("qwen"):
        assert fixed["num_experts"] == saved.get("num_experts", saved.get("num_local_experts"))

    def identity(config):
        return config_hash(AutoConfig.for_model(**config).to_dict())

    assert identity(fixed) == identity(saved)


def test_mlx_keys_are_removed_but_a_hub_quantization_config_is_kept():
    quantization = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert without_mlx_keys({"a": 1, "quantization": quantization, "quantization_config": quantization}) == {"a": 1}
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert without_mlx_keys({"a": 1, "quantization_config": fp8}) == {"a": 1, "quantization_config": fp8}


def test_the_converted_layout_is_recognised():
    assert is_converted({"quantization": {"bits": 4}}, [], None)
    assert is_converted({}, ["model.layers.0.mlp.switch_mlp.up_proj.weight"], None)
    assert is_converted({}, ["model.layers.0.mlp.experts.gate_proj.weight"], {"format": "mlx"})  # gpt-oss naming
    assert not is_converted({}, ["model.layers.0.mlp.experts.3.up_proj.weight"], {"format": "pt"})


def test_mlx_not_installed_names_the_extra(tmp_path, monkeypatch, capsys):
    source = tiny_checkpoint(tmp_path / "model", "qwen3_moe")
    write_calibration(tmp_path / "cal.jsonl", 3)
    for name in ("mlx", "mlx.core", "mlx_lm"):
        monkeypatch.setitem(sys.modules, name, None)
    capsys.readouterr()
    code = main(["profile", str(source), "--backend", "mlx", "--calibration", str(tmp_path / "cal.jsonl"), "--out",
                 str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'moescope[mlx]'" in err and "(mlx is" in err
    assert not (tmp_path / "p").exists()


def test_a_family_mlx_lm_does_not_implement(tmp_path, capsys):
    pytest.importorskip("mlx_lm")
    source = tiny_checkpoint(tmp_path / "model", "cohere2_moe")
    write_calibration(tmp_path / "cal.jsonl", 3)
    capsys.readouterr()
    code = main(["profile", str(source), "--backend", "mlx", "--calibration", str(tmp_path / "cal.jsonl"), "--out",
                 str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "does not implement model_type 'cohere2_moe': use --backend hf" in err


def test_a_converted_config_without_the_keys_mlx_lm_needs(tmp_path, capsys):
    pytest.importorskip("mlx_lm")
    source = tiny_checkpoint(tmp_path / "model", "qwen3_moe")
    assert main(["quantize", str(source), "--bits", "4", "--backend", "mlx", "--out", str(tmp_path / "q")]) == 0
    assert is_mlx_layout(tmp_path / "q") and resolve_backend(tmp_path / "q") == "mlx"
    with pytest.raises(MoescopeError, match="converted layout, which transformers cannot load: use --backend mlx"):
        resolve_backend(tmp_path / "q", "hf")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    for key in ("num_experts", "num_local_experts"):
        config.pop(key)
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    write_calibration(tmp_path / "cal.jsonl", 3)
    capsys.readouterr()
    code = main(["profile", str(tmp_path / "q"), "--calibration", str(tmp_path / "cal.jsonl"), "--out",
                 str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "config.json lacks keys mlx-lm needs for model_type 'qwen3_moe': num_experts" in err
