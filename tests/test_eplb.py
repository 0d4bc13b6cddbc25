"""`moescope export PROFILE --format eplb`: the load matrix as SGLang's --init-expert-location reads it."""

from __future__ import annotations

import json

import numpy as np
import torch
from helpers import save_with_tokenizer, tokenizer, write_calibration

from moescope.cli import main
from moescope.models.tiny import tiny_model
from moescope.profiling.run import ProfileOptions, profile_model


def test_eplb_rows_are_decoder_layers_with_dense_ones_empty(tmp_path, capsys):
    model = tiny_model("deepseek_v3")  # layer 0 dense, layer 1 MoE
    save_with_tokenizer(model, tmp_path / "model")
    profile = profile_model(model, tokenizer(), write_calibration(tmp_path / "cal.jsonl"), tmp_path / "p",
                            ProfileOptions(generate=2, progress=False))
    assert main(["export", str(tmp_path / "p"), "--format", "eplb", "--out", str(tmp_path / "load.json"),
                 "--model", str(tmp_path / "model")]) == 0
    document = json.loads((tmp_path / "load.json").read_text())
    # SGLang: torch.tensor(logical_count), a 2-D matrix unsqueezed to one window, summed over windows by EPLB
    weight = torch.tensor(document["logical_count"]).unsqueeze(0).sum(0)
    assert weight.shape == (model.config.num_hidden_layers, model.config.n_routed_experts)
    assert weight.dtype == torch.int64 and not weight[0].any()
    np.testing.assert_array_equal(weight[1].numpy(), profile.counters["selections"].sum((0, 1))[0])
    assert weight[1].sum() == profile.counters["tokens"].sum() * model.config.num_experts_per_tok
    assert document["moescope"]["moe_layers"] == [1] and "physical_to_logical_map" not in document
    assert main(["export", str(tmp_path / "p"), "--format", "eplb", "--out", str(tmp_path / "load.txt")]) == 2
    assert main(["export", str(tmp_path / "p"), "--format", "mlx", "--out", str(tmp_path / "x.py")]) == 2
    assert "is a profile: it exports to eplb" in capsys.readouterr().err
    other = tiny_model("qwen3_moe")
    save_with_tokenizer(other, tmp_path / "other")
    assert main(["export", str(tmp_path / "p"), "--format", "eplb", "--out", str(tmp_path / "o.json"),
                 "--model", str(tmp_path / "other")]) == 2
    assert "another model" in capsys.readouterr().err and not (tmp_path / "o.json").exists()
