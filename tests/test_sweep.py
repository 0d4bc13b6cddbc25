"""`moescope sweep prune|quant` on a real tiny checkpoint: one row per point and group, a baseline of 1, a plot."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import WORDS, save_with_tokenizer, tokenizer, write_calibration

from moescope.backends.hf.loading import Placement, load_model
from moescope.cli import main
from moescope.compress.quant.allocation import tiered_plan
from moescope.compress.quant.apply import apply_bit_plan, uniform_plan
from moescope.judge.evaluate import Protocol, group_perplexities, load_windows
from moescope.judge.sweep import sweep_prune
from moescope.models.tiny import tiny_model
from moescope.plans import QuantOptions
from moescope.profiling.run import ProfileOptions, profile_model


def checkpoint_profile_and_data(tmp_path, model_type: str):
    """A saved tiny model (tmp_path/model), its profile (tmp_path/profile) and held-out data in two domains."""
    model = tiny_model(model_type)
    save_with_tokenizer(model, tmp_path / "model")
    profile_model(model, tokenizer(), write_calibration(tmp_path / "cal.jsonl", 9), tmp_path / "profile",
                  ProfileOptions(progress=False))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "domain": ["math", "code"][i % 2], "lang": "en",
                                        "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40))}) + "\n"
                            for i in range(8)))
    return data


def test_sweep_cli_writes_csv_and_plot(tmp_path, capsys):
    data = checkpoint_profile_and_data(tmp_path, "olmoe")
    assert main(["sweep", "prune", str(tmp_path / "model"), "--profile", str(tmp_path / "profile"),
                 "--ratios", "0.125,0.25", "--criteria", "frequency,gate-mass", "--data", str(data),
                 "--seq-len", "16", "--sequences", "4", "--dtype", "float32", "--out", str(tmp_path / "sweep")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert len(rows) == 2 + 2 * 2 * 2  # baseline per group + criteria x ratios x groups
    assert {float(r["vs_baseline"]) for r in rows if r["criterion"] == "none"} == {1.0}
    assert {int(r["experts_pruned"]) for r in rows if r["criterion"] != "none"} == {2, 4}
    assert any(float(r["vs_baseline"]) != 1.0 for r in rows if r["criterion"] != "none")
    svg = (tmp_path / "sweep" / "sweep.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 * 2  # criteria x domains
    assert "sweep.svg" in capsys.readouterr().out


def test_sweep_keeps_each_windows_nll_for_intervals(tmp_path):
    """The per-window NLLs a sweep hands back average to the perplexities of its rows."""
    data = checkpoint_profile_and_data(tmp_path, "qwen3_moe")
    per_window = {}
    rows = sweep_prune(str(tmp_path / "model"), str(tmp_path / "profile"), [0.25], ["frequency"], "remove", str(data),
                       Protocol(seq_len=16, sequences=4, placement=Placement(dtype="float32")), per_window=per_window)
    assert set(per_window) == {("none", 0.0), ("remove frequency", 0.25)}
    for row in rows:
        nll = per_window[(row["variant"], row["ratio"])][(row["domain"], row["lang"])]
        assert len(nll) == 4 and row["perplexity"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-9)


def test_tiered_plan_puts_the_most_important_experts_in_the_top_tier():
    model = tiny_model("qwen3_moe")
    importance = np.arange(16, dtype=float).reshape(2, 8)  # layer 1's experts matter most
    plan = tiered_plan(model, importance, 2.5, QuantOptions())
    assert plan.layers == {0: [2] * 8, 1: [3] * 8}
    plan = tiered_plan(model, importance, 4, QuantOptions())  # a width: tiers strictly around it, 3 and 8
    bits = np.array([plan.layers[0], plan.layers[1]])
    assert bits.mean() <= 4 and (bits == 8).sum() == 3 and set(bits[1, -3:]) == {8}


def test_sweep_quant_compares_plans_at_equal_bits(tmp_path, capsys):
    data = checkpoint_profile_and_data(tmp_path, "qwen3_moe")
    protocol = ["--seq-len", "16", "--sequences", "4", "--dtype", "float32"]
    assert main(["sweep", "quant", str(tmp_path / "model"), "--profile", str(tmp_path / "profile"), "--bits",
                 "2.5,3,4", "--data", str(data), *protocol, "--out", str(tmp_path / "sweep")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    plans = [(r["plan"], float(r["target_bits"])) for r in rows if r["domain"] == "math"]
    assert plans == [("original", 16), ("tiered", 2.5), ("budget", 2.5), ("uniform", 3), ("tiered", 3),
                     ("budget", 3), ("uniform", 4), ("tiered", 4), ("budget", 4)]
    for r in rows:
        assert float(r["avg_bits"]) <= float(r["target_bits"]) + 1e-9
        assert r["plan"] != "uniform" or float(r["avg_bits"]) == float(r["target_bits"])
    # Weights are restored between plans: uniform 4-bit equals quantising a fresh copy.
    fresh = load_model(tmp_path / "model", dtype="float32")
    apply_bit_plan(fresh, uniform_plan(fresh, 4))
    windows = load_windows(data, tokenizer(), Protocol(16, 4, 42, 8, "float32"), fresh)
    expected = group_perplexities(fresh, windows)
    got = {(r["domain"], r["lang"]): float(r["perplexity"]) for r in rows if r["plan"] == "uniform"
           and r["target_bits"] == "4.0"}
    assert got == pytest.approx(expected, rel=1e-6)
    svg = (tmp_path / "sweep" / "sweep.svg").read_text()
    assert svg.count("<polyline") == 3 * 2  # plans x domains

    # Fisher importance needs no profile's ranking but its calibration prompts; tiers rank by the Fisher loss.
    # Every plan quantises with MSE-searched scales here.
    fisher = ["sweep", "quant", str(tmp_path / "model"), "--bits", "3", "--importance", "fisher", "--data", str(data),
              *protocol, "--scales", "mse"]
    capsys.readouterr()
    assert main([*fisher, "--out", str(tmp_path / "x")]) == 2
    assert "needs --calibration" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*fisher, "--calibration", str(tmp_path / "cal.jsonl"), "--out", str(tmp_path / "fisher")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "fisher" / "sweep.csv")))
    assert {r["plan"] for r in rows} == {"original", "uniform", "tiered", "budget"}
    assert all(float(r["avg_bits"]) <= 3 + 1e-9 for r in rows if r["plan"] != "original")
    fresh = load_model(tmp_path / "model", dtype="float32")
    expected = group_perplexities(apply_bit_plan(fresh, uniform_plan(fresh, 3, QuantOptions(scales="mse"))), windows)
    got = {(r["domain"], r["lang"]): float(r["perplexity"]) for r in rows if r["plan"] == "uniform"}
    assert got == pytest.approx(expected, rel=1e-6)
    mlx = [*fisher[:-2], "--scales", "mlx", "--calibration", str(tmp_path / "cal.jsonl")]
    assert main([*mlx, "--out", str(tmp_path / "x")]) == 2  # MLX's rule is affine
    assert "needs asymmetric quantisation" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*mlx, "--asymmetric", "--out", str(tmp_path / "mlx")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "mlx" / "sweep.csv")))
    fresh = load_model(tmp_path / "model", dtype="float32")
    options = QuantOptions(symmetric=False, scales="mlx")
    expected = group_perplexities(apply_bit_plan(fresh, uniform_plan(fresh, 3, options)), windows)
    assert {(r["domain"], r["lang"]): float(r["perplexity"]) for r in rows if r["plan"] == "uniform"} == pytest.approx(
        expected, rel=1e-6)
    assert main([*fisher[:4], "1.5", *fisher[5:], "--out", str(tmp_path / "x")]) == 2
    assert "--bits: 1.5 is out of range: give a number in [2, 8]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main([*fisher[:6], "gate-energy", *fisher[7:], "--out", str(tmp_path / "x")]) == 2
    assert "needs --profile" in capsys.readouterr().err


def test_sweep_puts_removal_merging_and_repair_in_one_table(tmp_path):
    data = checkpoint_profile_and_data(tmp_path, "qwen3_moe")
    common = ["sweep", "prune", str(tmp_path / "model"), "--profile", str(tmp_path / "profile"), "--ratios", "0.25",
              "--criteria", "frequency", "--data", str(data), "--seq-len", "16", "--sequences", "4", "--dtype",
              "float32"]
    assert main([*common, "--methods", "remove,merge", "--merge-methods", "hc-smoe,m-smoe", "--repair",
                 "--repair-steps", "20", "--calibration", str(tmp_path / "cal.jsonl"), "--calibration-prompts", "9",
                 "--out", str(tmp_path / "both")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "both" / "sweep.csv")))
    variants = ["remove frequency", "merge hc-smoe", "merge m-smoe"]
    assert {r["variant"] for r in rows} == {"none", *variants, *(f"{v} +repair" for v in variants)}
    assert {int(r["experts_pruned"]) for r in rows if r["variant"] != "none"} == {4}  # 2 of 8 in each of 2 layers
    for variant in variants:
        plain = {r["domain"]: float(r["perplexity"]) for r in rows if r["variant"] == variant}
        repaired = {r["domain"]: float(r["perplexity"]) for r in rows if r["variant"] == f"{variant} +repair"}
        assert plain.keys() == repaired.keys() == {"math", "code"} and plain != repaired
    # Removal rows are those of a removal-only sweep: the other methods do not disturb them.
    assert main([*common, "--out", str(tmp_path / "remove")]) == 0
    alone = {r["domain"]: float(r["perplexity"]) for r in csv.DictReader(open(tmp_path / "remove" / "sweep.csv"))
             if r["variant"] == "remove frequency"}
    assert alone == pytest.approx({r["domain"]: float(r["perplexity"]) for r in rows
                                   if r["variant"] == "remove frequency"}, rel=1e-6)
    svg = (tmp_path / "both" / "sweep.svg").read_text()
    assert svg.count("<polyline") == 6 * 2 and svg.count('stroke-dasharray="6,3"><title>') == 3 * 2
