"""Tiers relative to the fair share, their bit plan in the quantize format, and `moescope plan tiers`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import tokenizer, write_calibration

from moescope.analysis.tiers import TIERS, TierOptions, classify, load_ratio, tier_bit_plan, tier_counts
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.plans import PrunePlan, load_bit_plan
from moescope.profiling.run import ProfileOptions, profile_model


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    from moescope.models.tiny import tiny_model

    tmp = tmp_path_factory.mktemp("tiers")
    prompts = write_calibration(tmp / "cal.jsonl", 12)
    profile = profile_model(tiny_model("qwen3_moe"), tokenizer(), prompts, tmp / "profile",
                            ProfileOptions(progress=False))
    return tmp, profile


def test_tiers_by_hand():
    ratio = load_ratio(np.array([[8.0, 4, 2, 1, 1, 0, 0, 0]]), [8])
    np.testing.assert_allclose(ratio, [[4, 2, 1, 0.5, 0.5, 0, 0, 0]])
    assert classify(ratio, TierOptions(), [2]).tolist() == [[0, 0, 1, 1, 1, 3, 3, 3]]
    strict = TierOptions(critical=3, standard=0.75, prune=0.6)
    assert classify(ratio, strict, [2]).tolist() == [[0, 1, 1, 3, 3, 3, 3, 3]]


def test_a_layer_keeps_top_k_experts():
    ratio = load_ratio(np.array([[10.0, 0.01, 0.02, 0]]), [4])
    assert classify(ratio, TierOptions(), [3]).tolist() == [[0, 2, 2, 3]]  # the two most used prune-tier rescued


def test_thresholds_are_relative_to_the_fair_share():
    """A uniform layer is all standard at any width; 4 of 16 experts taking everything are at 4x: critical."""
    for experts in (16, 128, 512):
        tiers = classify(load_ratio(np.ones((1, experts)), [experts]), TierOptions(), [2])
        assert (tiers == 1).all()
    mixed = load_ratio(np.array([[1.0] * 8 + [0.0] * 8, [1.0] * 4 + [0.0] * 12]), [8, 16])
    assert tier_counts(classify(mixed, TierOptions(), [2])).tolist() == [[0, 8, 0, 0], [4, 0, 0, 12]]


def test_padding_slots_of_narrower_layers():
    tiers = classify(load_ratio(np.array([[1.0, 1, 1, 1], [1, 1, 0, 0]]), [4, 2]), TierOptions(), [1])
    assert tiers[1].tolist() == [1, 1, -1, -1]
    assert tier_counts(tiers)[1].tolist() == [0, 2, 0, 0]


@pytest.mark.parametrize("options", [TierOptions(prune=-0.1), TierOptions(standard=3), TierOptions(prune=1),
                                     TierOptions(critical=math.inf), TierOptions(standard=math.nan),
                                     TierOptions(bits=(8, 4, 0, 0)), TierOptions(bits=(8, 5, 2, 0)),
                                     TierOptions(bits=(8, 4))])
def test_bad_options(options):
    with pytest.raises(MoescopeError):
        options.check()


def test_bit_plan_in_the_quantize_format(profiled):
    tmp, profile = profiled
    plan, prune = tier_bit_plan(profile, TierOptions(standard=0.8, prune=0.6), "p")
    from moescope.plans import save_bit_plan

    save_bit_plan(plan, tmp / "bits.json")
    loaded = load_bit_plan(tmp / "bits.json")
    assert loaded.method == "tiers" and loaded.model.model_type == "qwen3_moe"
    for layer in profile.layers:
        bits = loaded.layers[layer["layer"]]
        assert len(bits) == layer["num_experts"] and set(bits) <= {8, 4, 2}
        assert all(bits[e] == 2 for e in prune[layer["layer"]])
        counts = loaded.source["tiers"][str(layer["layer"])]
        assert [counts[t] for t in TIERS[:2]] == [bits.count(8), bits.count(4)]
        assert counts["prune"] == len(prune[layer["layer"]])
    assert any(prune.values())
    _, nothing = tier_bit_plan(profile, TierOptions(standard=0.8, prune=0.6, bits=(8, 4, 3, 2)))
    assert not any(nothing.values())


def test_tier_plan_fits_the_profiled_model(profiled, tiny):
    from moescope.compress.quant.apply import check_plan

    _, profile = profiled
    plan, _ = tier_bit_plan(profile, TierOptions())
    assert len(check_plan(plan, tiny("qwen3_moe"))) == len(profile.layers)  # model identity, layers, expert counts


def test_plan_tiers_cli(profiled, capsys):
    tmp, _ = profiled
    profile = str(tmp / "profile")
    assert main(["plan", "tiers", profile, "--out", str(tmp / "b.json"), "--prune-out", str(tmp / "prune.json"),
                 "--prune-below", "0.6", "--standard", "0.8"]) == 0
    assert "critical (8 bits)" in capsys.readouterr().out
    assert load_bit_plan(tmp / "b.json").method == "tiers"
    plan = PrunePlan.load(tmp / "prune.json")
    assert plan.criterion == "tiers:frequency" and any(plan.prune.values())
    assert main(["plan", "tiers", profile, "--out", str(tmp / "c.json"), "--tier-bits", "8,4,3,2",
                 "--criterion", "gate-mass"]) == 0
    assert set(sum(load_bit_plan(tmp / "c.json").layers.values(), [])) <= {8, 4, 3, 2}
    assert main(["plan", "tiers", profile, "--out", str(tmp / "d.json"), "--standard", "5"]) == 2
    assert main(["plan", "tiers", profile, "--out", str(tmp / "d.json"), "--tier-bits", "8,x"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp / "d.json").exists()
