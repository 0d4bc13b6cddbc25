"""Prune plans from real profiles of tiny models, and the plan/prune CLI end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import save_with_tokenizer, tokenizer, write_calibration

from moescope.analysis.criteria import profile_scores
from moescope.analysis.selection import make_prune_plan
from moescope.cli import main
from moescope.compress.prune import routing_offsets
from moescope.errors import MoescopeError
from moescope.judge.ablation import ablation_scores
from moescope.judge.nll import window_nll
from moescope.models.tiny import tiny_model
from moescope.plans import PrunePlan
from moescope.profiling.run import ProfileOptions, profile_model


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    model = tiny_model("qwen3_moe")
    prompts = write_calibration(tmp / "cal.jsonl", 12)
    save_with_tokenizer(model, tmp / "model")  # first: saving adds `architectures` to the config, as loading does
    profile = profile_model(model, tokenizer(), prompts, tmp / "profile",
                            ProfileOptions(progress=False, saliency=True))
    return tmp, model, profile


@pytest.mark.parametrize("criterion", ["frequency", "gate-mass", "saliency"])
def test_lowest_scores_are_pruned(profiled, criterion):
    _, _, profile = profiled
    plan = make_prune_plan(profile, criterion, ratio=0.25)
    scores = profile_scores(profile, criterion)
    for row, layer in enumerate(profile.layers):
        pruned = plan.prune[layer["layer"]]
        assert len(pruned) == 2
        kept = [e for e in range(8) if e not in pruned]
        assert scores[row, pruned].max() <= scores[row, kept].min()
    assert plan.criterion == criterion and plan.model.model_type == "qwen3_moe"


def test_frequency_counts_selections_and_gate_mass_sums_weights(profiled):
    _, _, profile = profiled
    frequency = profile_scores(profile, "frequency")
    assert frequency.sum() == profile.counters["selections"].sum()
    gate = profile_scores(profile, "gate-mass")
    assert np.all(gate <= frequency + 1e-9)  # renormalised top-2 weights are at most 1 each


def test_budgets_threshold_and_protection(profiled):
    _, _, profile = profiled
    per_layer = make_prune_plan(profile, "frequency", layer_ratios={profile.layers[0]["layer"]: 0.5})
    assert [len(per_layer.prune[layer["layer"]]) for layer in profile.layers] == [4, 0]
    threshold = make_prune_plan(profile, "frequency", threshold=0.5)
    scores = profile_scores(profile, "frequency")
    for row, layer in enumerate(profile.layers):
        expected = [e for e in range(8) if scores[row, e] < 0.5 * scores[row].mean()]
        assert threshold.prune[layer["layer"]] == expected
    domain = profile.domains[0]
    protected = make_prune_plan(profile, "frequency", ratio=0.5, protect_domains=(domain,))
    counts = profile.counters["selections"][:, profile.domains.index(domain)].sum(0)
    for row, layer in enumerate(profile.layers):
        favourites = np.flatnonzero(counts[row] / counts[row].sum() >= 2 / 8)
        assert not set(favourites) & set(protected.prune[layer["layer"]])


def test_bad_budgets(profiled):
    _, _, profile = profiled
    with pytest.raises(MoescopeError, match="give a budget"):
        make_prune_plan(profile, "frequency")
    with pytest.raises(MoescopeError, match="out of range"):
        make_prune_plan(profile, "frequency", ratio=1.5)
    with pytest.raises(MoescopeError, match="fewer than top-k"):
        make_prune_plan(profile, "frequency", ratio=0.9)
    with pytest.raises(MoescopeError, match="no such domain"):
        make_prune_plan(profile, "frequency", ratio=0.1, protect_domains=("klingon",))
    without = type(profile)(profile.model, profile.layers, profile.settings, profile.domains, profile.langs,
                            profile.prompts, {k: v for k, v in profile.counters.items() if k != "saliency_sum"})
    with pytest.raises(MoescopeError, match="profile again with --saliency"):
        make_prune_plan(without, "saliency", ratio=0.1)


def test_batched_ablation_equals_masking_one_expert_at_a_time():
    model = tiny_model("olmoe")
    windows = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    batched = ablation_scores(model, windows, max_rows=6, progress=False)
    def mean_loss() -> float:
        return float(window_nll(model, windows).sum()) / (windows.numel() - len(windows))

    base = mean_loss()
    for layer, expert in [(0, 0), (0, 5), (1, 7)]:
        offset = torch.zeros(8)
        offset[expert] = float("-inf")
        with routing_offsets(model, {layer: offset}):
            alone = mean_loss() - base
        assert batched[layer][expert] == pytest.approx(float(alone), abs=1e-5)


def test_cli_plan_then_prune_with_replay(profiled, capsys):
    tmp, _, _ = profiled
    plan_file = tmp / "plan.json"
    assert main(["plan", "prune", str(tmp / "profile"), "--criterion", "frequency", "--ratio", "0.25",
                 "--out", str(plan_file)]) == 0
    assert "4 of 16 experts to prune" in capsys.readouterr().out
    plan = PrunePlan.load(plan_file)
    assert main(["prune", str(tmp / "model"), "--plan", str(plan_file), "--method", "remove",
                 "--out", str(tmp / "removed"), "--calibration", str(tmp / "cal.jsonl")]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["prune", str(tmp / "model"), "--plan", str(plan_file), "--method", "row-1e9",
                 "--out", str(tmp / "row"), "--calibration", str(tmp / "cal.jsonl")]) == 0
    assert plan.prune and "%" in capsys.readouterr().out
    assert main(["prune", str(tmp / "model"), "--plan", str(plan_file), "--method", "mask",
                 "--out", str(tmp / "mask"), "--calibration", str(tmp / "cal.jsonl")]) == 2
    assert "no router bias" in capsys.readouterr().err
    assert not (tmp / "mask").exists()
