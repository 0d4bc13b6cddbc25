"""`moescope quantize` on real saved checkpoints: the written model loads with the quantised weights,
budgets from a profile hold, and bad plans and budgets get one line."""

from __future__ import annotations

import copy
import json

import numpy as np
import torch

from moescope.compress.quant.apply import apply_bit_plan, check_plan_file, uniform_plan
from moescope.compress.quant.memory import memory_estimate
from moescope.plans import BitPlan, QuantOptions, load_bit_plan, save_bit_plan


def test_cli_writes_a_checkpoint_that_loads_with_the_quantised_weights(tmp_path, capsys):
    from moescope.backends.hf.loading import load_model
    from moescope.cli import main
    from moescope.models.tiny import save_tiny_model

    source, out = tmp_path / "model", tmp_path / "q4"
    save_tiny_model("qwen3_moe", str(source))
    (source / "tokenizer_config.json").write_text("{}")
    assert main(["quantize", str(source), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    assert "packed size" in capsys.readouterr().out
    assert (out / "tokenizer_config.json").exists() and (out / "bit_plan.json").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    original = load_model(source)
    expected = apply_bit_plan(copy.deepcopy(original), uniform_plan(original, 4, QuantOptions(group_size=32)))
    written = load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), written.state_dict().values(),
                                                 strict=True))
    plan = check_plan_file(out / "bit_plan.json", original)
    assert main(["quantize", str(source), "--bits", "2", "--scales", "mse", "--out", str(tmp_path / "q2")]) == 0
    options = QuantOptions(scales="mse")
    expected = apply_bit_plan(copy.deepcopy(original), uniform_plan(original, 2, options)).state_dict()
    assert load_bit_plan(tmp_path / "q2" / "bit_plan.json").options == options
    assert all(torch.equal(expected[k], v) for k, v in load_model(tmp_path / "q2").state_dict().items())
    assert main(["quantize", str(source), "--bits", "4", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(source), "--plan", str(out / "bit_plan.json"), "--out", str(out), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert main(["quantize", str(source), "--plan", str(out / "bit_plan.json"), "--scales", "mse", "--asymmetric",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--asymmetric, --scales: with --plan the plan says how to quantise" in capsys.readouterr().err
    save_bit_plan(BitPlan({0: [4] * 8}, plan.model), tmp_path / "short.json")
    assert main(["quantize", str(source), "--plan", str(tmp_path / "short.json"), "--out", str(tmp_path / "x")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("moescope quantize: error: bit plan is for another model") and not (tmp_path / "x").exists()
    assert main(["quantize", str(source), "--plan", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"moescope quantize: error: bit plan {tmp_path / 'none.json'} does not exist\n"


def test_cli_allocates_under_a_budget_from_a_profile(tmp_path, capsys):
    from moescope.backends.hf.loading import describe_layers, load_model, model_identity
    from moescope.cli import main
    from moescope.models.tiny import save_tiny_model
    from moescope.profiling.store import FIXED_SCALE, Profile

    source = tmp_path / "model"
    save_tiny_model("mixtral", str(source))
    model = load_model(source)
    info, layers = model_identity(model), describe_layers(model)
    profile = Profile.empty(info, layers, {}, ["prose"], ["en"])
    rng = np.random.default_rng(0)
    profile.counters["tokens"][0, 0] = 100
    for i, layer in enumerate(layers):
        selections = rng.multinomial(100 * layer["top_k"], rng.dirichlet(np.ones(layer["num_experts"]) * 0.3))
        profile.counters["selections"][0, 0, i] = selections
        profile.counters["weight_sum"][0, i] = selections * FIXED_SCALE // 2
        profile.counters["weight_sq"][0, i] = selections * FIXED_SCALE // 4
    profile.save(tmp_path / "profile")

    out = tmp_path / "q3"
    args = ["quantize", str(source), "--budget", "3.0", "--profile", str(tmp_path / "profile"), "--group-size", "32"]
    assert main([*args, "--out", str(out)]) == 0
    plan = load_bit_plan(out / "bit_plan.json")
    bits = np.array([plan.layers[i] for i in sorted(plan.layers)])
    assert plan.method == "budget" and plan.source["importance"] == "gate-energy" and bits.mean() <= 3.0
    assert len(set(bits.ravel())) > 1 and "3.00 average bits" in capsys.readouterr().out
    assert main([*args[:3], "1.5", *args[4:], "--out", str(tmp_path / "x")]) == 2
    assert "below the minimum possible 2 average bits" in capsys.readouterr().err
    assert main([*args[:3], "3", "--out", str(tmp_path / "x")]) == 2
    assert "needs --profile" in capsys.readouterr().err
    assert main([*args[:3], "three", "--out", str(tmp_path / "x")]) == 2
    assert "give average bits" in capsys.readouterr().err
    from helpers import tokenizer, write_calibration

    tokenizer().save_pretrained(source)
    write_calibration(tmp_path / "calibration.jsonl", count=30)
    assert main([*args, "--calibration", str(tmp_path / "calibration.jsonl"), "--out", str(tmp_path / "o")]) == 0
    measured = load_bit_plan(tmp_path / "o" / "bit_plan.json")
    assert "output error" in measured.source["distortion"] and measured.layers != plan.layers
    fisher = [*args[:4], "--importance", "fisher", "--group-size", "32", "--out", str(tmp_path / "f")]
    assert main(fisher) == 2 and "needs --calibration" in capsys.readouterr().err  # no profile needed, prompts are
    assert main([*fisher, "--calibration", str(tmp_path / "calibration.jsonl")]) == 0
    by_fisher = load_bit_plan(tmp_path / "f" / "bit_plan.json")
    assert "Fisher" in by_fisher.source["distortion"] and "profile" not in by_fisher.source
    assert np.mean([by_fisher.layers[i] for i in sorted(by_fisher.layers)]) <= 3.0
    size = memory_estimate(load_model(source), plan).total_bytes
    assert main([*args[:3], f"{size / 1e3}KB", *args[4:], "--out", str(tmp_path / "bytes")]) == 0
    assert memory_estimate(load_model(source), load_bit_plan(tmp_path / "bytes" / "bit_plan.json")).total_bytes <= size
