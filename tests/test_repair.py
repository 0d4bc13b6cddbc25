"""Router repair and merging through the CLI on real tiny checkpoints: repair changes the router
weights and nothing else, moves routing towards the original's, and bad input is refused in one line."""

from __future__ import annotations

import pytest
import torch
from helpers import save_with_tokenizer, tokenizer, write_calibration
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moescope.analysis.selection import make_prune_plan
from moescope.checkpoints import read_metadata
from moescope.cli import main
from moescope.models.registry import find_moe_layers
from moescope.models.tiny import tiny_model
from moescope.plans import MergePlan
from moescope.profiling.run import ProfileOptions, profile_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny qwen3_moe, its profile, a calibration set and a prune plan (25 % by frequency)."""
    root = tmp_path_factory.mktemp("repair")
    model = tiny_model("qwen3_moe")
    save_with_tokenizer(model, root / "model")
    prompts = write_calibration(root / "cal.jsonl", 24)
    profile = profile_model(model, tokenizer(), prompts, root / "profile", ProfileOptions(progress=False))
    make_prune_plan(profile, "frequency", ratio=0.25).save(root / "plan.json")
    return root


def tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_repair_changes_the_router_weights_and_nothing_else(workspace, capsys):
    root = workspace
    common = ["prune", str(root / "model"), "--plan", str(root / "plan.json"), "--fit-prompts", "24"]
    assert main([*common, "--out", str(root / "removed"), "--replay-prompts", "0"]) == 0
    assert main([*common, "--repair-router", "--calibration", str(root / "cal.jsonl"), "--out",
                 str(root / "repaired"), "--replay-prompts", "4"]) == 0
    printed = capsys.readouterr().out
    assert "router repair: agreement" in printed and "routing agreement with the original" in printed
    plain, repaired = tensors(root / "removed"), tensors(root / "repaired")
    assert plain.keys() == repaired.keys()
    routers = [name for name in plain if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and any(not torch.equal(plain[n], repaired[n]) for n in routers)
    for name in plain.keys() - set(routers):
        assert torch.equal(plain[name], repaired[name]), name
    report = read_metadata(root / "repaired")["repair"]
    assert read_metadata(root / "repaired")["method"] == "remove"
    fitted = report["fit"].values()
    assert all(f["divergence_after"] <= f["divergence_before"] for f in fitted)
    assert any(f["divergence_after"] < 0.9 * f["divergence_before"] for f in fitted)
    assert set(report["check_before"]) == set(report["check_after"]) == {"0", "1"}
    AutoModelForCausalLM.from_pretrained(root / "repaired")  # stock transformers loads it


def test_merge_and_repair_through_the_cli(workspace, capsys):
    root = workspace
    assert main(["plan", "merge", str(root / "profile"), "--ratio", "0.25", "--method", "m-smoe", "--model",
                 str(root / "model"), "--calibration", str(root / "cal.jsonl"), "--out", str(root / "merge.json")]) == 0
    plan = MergePlan.load(root / "merge.json")
    assert {plan.merged_count(layer) for layer in plan.num_experts} == {6}
    assert plan.source["similarity"] == "outputs" and plan.source["similarity_tokens"] > 0
    assert main(["prune", str(root / "model"), "--plan", str(root / "merge.json"), "--method", "merge",
                 "--repair-router", "--calibration", str(root / "cal.jsonl"), "--out", str(root / "merged"),
                 "--replay-prompts", "4"]) == 0
    printed = capsys.readouterr().out
    assert "merged router rows" in printed and "loads with {0: 6, 1: 6} experts" in printed
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    assert [layer.num_experts for layer in find_moe_layers(merged)] == [6, 6]
    meta = read_metadata(root / "merged")
    assert meta["method"] == "merge" and "repair" in meta and MergePlan.from_json(meta["plan"]) == plan


def test_bad_input_is_refused_in_one_line(workspace, tmp_path, capsys):
    root = workspace
    prune = ["prune", str(root / "model"), "--plan", str(root / "plan.json"), "--out", str(tmp_path / "x")]
    assert main([*prune, "--repair-router"]) == 2
    assert "--repair-router needs --calibration FILE" in capsys.readouterr().err
    assert main([*prune, "--method", "merge"]) == 2
    assert "a merge plan is applied only with --method merge" in capsys.readouterr().err
    merge = ["plan", "merge", str(root / "profile"), "--model", str(root / "model"), "--calibration",
             str(root / "cal.jsonl"), "--out", str(tmp_path / "x.json")]
    assert main(["plan", "merge", str(root / "profile"), "--ratio", "0.25", "--out", str(tmp_path / "x.json")]) == 2
    assert "the profile does not record where its model is: pass --model DIR" in capsys.readouterr().err
    assert main([*merge, "--ratio", "0.9"]) == 2
    assert "down to 1 experts, fewer than top-k = 2: lower the ratio" in capsys.readouterr().err
    assert main([*merge, "--ratio", "0.25"]) == 0
    other = tiny_model("qwen3_moe", moe_intermediate_size=16)  # same type and expert count, another model
    save_with_tokenizer(other, tmp_path / "other")
    assert main(["prune", str(tmp_path / "other"), "--plan", str(tmp_path / "x.json"), "--method", "merge",
                 "--out", str(tmp_path / "x")]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moescope")]
    assert len(error) == 1 and "merge plan is for another model: config_hash" in error[0]
    sweep = ["sweep", "prune", str(root / "model"), "--profile", str(root / "profile"), "--ratios", "0.25",
             "--methods", "remove,merge", "--out", str(tmp_path / "x")]
    assert main(sweep) == 2
    assert "--methods merge and --repair need --calibration FILE" in capsys.readouterr().err
    assert main([*sweep[:-2], "--methods", "mask", "--repair", "--calibration", str(root / "cal.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--repair refits the routers of a written checkpoint; mask" in capsys.readouterr().err
    assert main([*sweep[:6], "0.9", *sweep[7:-2], "--calibration", str(root / "cal.jsonl"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "merges layer 0 down to 1 experts, fewer than top-k = 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
