"""Every metric against hand-computed values, the unseen-expert estimator against synthetic data
with a known number of experts, and `analyse` / `moescope stats` on a real profile of a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import tokenizer, write_calibration

from moescope.analysis.analyse import StatsOptions, analyse
from moescope.analysis.balance import (
    balance,
    bootstrap_balance,
    entropy_ratio,
    gini,
    hist_quantile,
    top_count,
    top_share,
)
from moescope.analysis.specificity import clusters, js_specificity, npmi
from moescope.analysis.uncertainty import (
    basic_interval,
    bootstrap_mean,
    chao2,
    chao2_variance,
    curve_points,
    extrapolate,
    grouped_bootstrap,
    lognormal_interval,
    prompts_needed,
    rarefaction,
    resample_weights,
    sample_size_curve,
    validate_unseen,
)
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import HIST_BINS, HIST_EDGES, Profile


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    from moescope.models.tiny import tiny_model

    tmp = tmp_path_factory.mktemp("metrics")
    prompts = write_calibration(tmp / "cal.jsonl", 12)
    profile = profile_model(tiny_model("qwen3_moe"), tokenizer(), prompts, tmp / "profile",
                            ProfileOptions(progress=False, coactivation=True, generate=2))
    return tmp / "profile", profile


def test_concentration_uniform_one_hot_and_known_values():
    uniform, one_hot = np.ones(4), np.array([0, 0, 0, 7])
    np.testing.assert_allclose(entropy_ratio(np.stack([uniform, one_hot, [1, 1, 0, 0]])), [1, 0, 0.5])
    np.testing.assert_allclose(gini(np.stack([uniform, one_hot, [1, 2, 3, 4]])), [0, 0.75, 0.25])
    np.testing.assert_allclose(top_share(np.array([1, 2, 3, 4]), 1), 0.4)
    np.testing.assert_allclose(top_share(np.array([[1, 2, 3, 4], [0, 0, 0, 0]]), 2), [0.7, 0])


def test_hist_quantile_interpolates_inside_log_bins():
    hist = np.zeros(HIST_BINS)
    hist[[30, 40]] = 10  # half the mass in bin 30 = [edge 29, edge 30), half in bin 40
    assert hist_quantile(hist, 0.5) == pytest.approx(HIST_EDGES[30])
    assert hist_quantile(hist, 0.25) == pytest.approx(math.sqrt(HIST_EDGES[29] * HIST_EDGES[30]))
    assert hist_quantile(hist, 1.0) == pytest.approx(HIST_EDGES[40])
    assert np.isnan(hist_quantile(np.zeros(HIST_BINS), 0.5))
    both = hist_quantile(np.stack([hist, np.eye(HIST_BINS)[0] * 4]), 0.5)
    np.testing.assert_allclose(both, [HIST_EDGES[30], HIST_EDGES[0] / 2])  # bin 0 is linear from 0


def test_specificity_is_js_divergence_from_the_layer_mix():
    counts = np.array([[10, 0, 5, 0],  # group A
                       [0, 10, 5, 0]])  # group B; layer mix 50/50
    js = js_specificity(counts)
    # expert 0 serves only A: JS((1, 0), (.5, .5)) with M = (.75, .25)
    expected = (math.log2(1 / 0.75) + 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) / 2
    np.testing.assert_allclose(js[:3], [expected, expected, 0], atol=1e-12)
    assert np.isnan(js[3])
    assert js_specificity(np.array([[3, 1, 0]]))[:2].tolist() == [0, 0]  # one group: nothing to prefer


def test_npmi_and_clusters():
    coact = np.array([[50, 25, 50, 0], [25, 50, 25, 0], [50, 25, 50, 0], [0, 0, 0, 20]])
    values = npmi(coact, np.diag(coact), 100)
    assert values[0, 1] == pytest.approx(0, abs=1e-6)  # 0.25 = 0.5 x 0.5: independent
    assert values[0, 2] == pytest.approx(1, abs=1e-6)  # always together
    assert values[0, 3] == -1 and np.isnan(values[1, 1])
    assert npmi(np.array([[10, 10], [10, 10]]), np.array([10, 10]), 10)[0, 1] == 1
    linked = np.zeros((6, 6), bool)
    for a, b in ((0, 1), (1, 2), (4, 5)):
        linked[a, b] = linked[b, a] = True
    assert clusters(linked) == [[0, 1, 2], [4, 5]]


def test_chao2_by_hand():
    incidence = np.array([1, 1, 1, 2, 5, 0, 0])  # Q1 = 3, Q2 = 1, m = 10
    assert chao2(incidence, 10) == pytest.approx(0.9 * 9 / 2)
    assert chao2(incidence, 10, cap=2) == 2
    assert chao2(np.array([1, 1, 3]), 10) == pytest.approx(0.9 * 2 * 1 / 2)  # Q2 = 0: bias-corrected form
    assert chao2(np.array([3, 4]), 10) == 0
    low, high = lognormal_interval(np.array(4.05), chao2_variance(incidence, 10, np.array(4.05)))
    assert 0 < low < 4.05 < high
    assert lognormal_interval(np.array(0.0), np.array(0.0)).tolist() == [0, 0]


def test_coverage_estimator_finds_a_known_number_of_experts():
    """120 live experts (per-prompt use probability 1-20 %) and 80 never used; 40 prompts seen."""
    live, dead, n = 120, 80, 40
    observed, estimated, covered, error, reached = [], [], 0, [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        presence = rng.random((3 * n, live + dead)) < np.concatenate([rng.uniform(0.01, 0.2, live), np.zeros(dead)])
        incidence = presence[:n].sum(0)
        seen = (incidence > 0).sum()
        q0 = chao2(incidence, n, (incidence == 0).sum())
        low, high = lognormal_interval(q0, chao2_variance(incidence, n, q0))
        observed.append(seen)
        estimated.append(seen + q0)
        covered += seen + low <= live <= seen + high
        error.append(extrapolate(incidence, n, n, q0) - (presence[: 2 * n].sum(0) > 0).sum())
        needed = int(prompts_needed(incidence, n, q0, 0.9))
        reached.append((presence[:needed].sum(0) > 0).sum() / live)
    assert abs(np.mean(estimated) - live) < 0.05 * live < abs(np.mean(observed) - live)
    assert covered >= 0.8 * 30  # nominal 95 %; the log-normal interval is approximate
    assert abs(np.mean(error)) < 2  # predicted vs actually seen after twice the prompts
    assert 0.85 < np.mean(reached) < 0.97


def test_prompts_needed_within_the_sample_is_where_the_mean_curve_gets_there():
    """Every expert used by every prompt: one prompt already reveals all, so 1 is needed, not the 50 given.
    Experts touched by half the prompts: the smallest n whose mean over orderings reaches 90 %."""
    assert prompts_needed(np.full(16, 50), 50, np.array(0.0), 0.99) == 1
    incidence = np.full(16, 25)
    needed = int(prompts_needed(incidence, 50, np.array(0.0), 0.9))
    seen_after = 16 - rarefaction(incidence, 50)
    assert seen_after[needed] >= 0.9 * 16 > seen_after[needed - 1] and 1 < needed < 50


def test_sample_size_curve_matches_the_exact_rarefaction():
    np.testing.assert_allclose(rarefaction(np.array([1, 2, 0]), 2), [3, 1.5, 1])  # by hand
    np.testing.assert_allclose(rarefaction(np.array([1, 2, -1]), 2, np.array([1])), [0.5])  # -1: padding
    rng = np.random.default_rng(0)
    presence = rng.random((30, 2, 70)) < rng.uniform(0, 0.2, (2, 70))
    valid = np.ones((2, 70), bool)
    valid[1, 60:] = False  # a narrower layer
    presence &= valid
    points = np.arange(31)
    curves = sample_size_curve(presence, valid, 400, rng, points)
    assert curves.shape == (400, 2, 31)
    assert (curves[:, :, 0] == [70, 60]).all() and (np.diff(curves, axis=2) <= 0).all()
    assert (curves[:, :, -1] == valid.sum(1) - presence.any(0).sum(1)).all()
    exact = rarefaction(np.where(valid, presence.sum(0), -1), 30)
    np.testing.assert_allclose(curves.mean(0), exact, atol=1.0)
    some = np.array([0, 3, 30])
    assert sample_size_curve(presence, valid, 3, rng, some).shape == (3, 2, 3)
    np.testing.assert_allclose(rarefaction(np.where(valid, presence.sum(0), -1), 30, some), exact[:, some])
    assert curve_points(10).tolist() == list(range(11))
    long = curve_points(10_000)
    assert long[0] == 0 and long[-1] == 10_000 and len(long) <= 200


def test_bootstrap_draws_every_prompt_alike():
    """N draws with replacement from N prompts: each prompt is drawn once per resample on average, and
    misses a resample with probability (1 - 1/N)^N, the last prompt as often as the first."""
    weights = resample_weights(5, 4000, np.random.default_rng(0))
    assert weights.shape == (4000, 5) and (weights.sum(1) == 5).all()
    np.testing.assert_allclose(weights.mean(0), 1, atol=0.05)
    np.testing.assert_allclose((weights == 0).mean(0), 0.8**5, atol=0.03)


def test_grouped_bootstrap_is_paired_within_each_group():
    """Two plans on the same windows of two groups: every resample keeps their difference (0 in one group,
    10 in the other, so 5 on average), and resamples average to the point."""
    groups = [np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]), np.array([[10.0, 30.0], [20.0, 40.0]])]
    point, samples = grouped_bootstrap(groups, 3000, np.random.default_rng(0))
    np.testing.assert_allclose(point, [(2.5 + 20) / 2, (2.5 + 30) / 2])
    assert samples.shape == (3000, 2)
    np.testing.assert_allclose(samples[:, 1] - samples[:, 0], 5.0)
    np.testing.assert_allclose(samples.mean(0), point, atol=0.3)
    assert samples[:, 0].std() > 1  # the windows do vary within a group


def test_bootstrap_and_validation_on_constant_data():
    assert bootstrap_mean(np.full((10, 3), 0.5), 50, np.random.default_rng(0)).tolist() == [[0.5] * 3] * 2
    presence = np.ones((10, 2, 8), bool)
    check = validate_unseen(presence, np.ones((2, 8), bool), 5, np.random.default_rng(0))
    assert check["mae"] == 0 and check["actual_total"] == 0 and check["prompts_used"] == 5


BALANCE = ("entropy_ratio", "gini", "top_share", "top_ratio")


def balance_point(counts: np.ndarray, num_experts: list[int], fraction: float) -> dict[str, list[float]]:
    """The balance metrics of summed counts [L, E], layer by layer with the one-layer functions."""
    out = {key: [] for key in BALANCE}
    for row, e in enumerate(num_experts):
        c, n = counts[row, :e], top_count(e, fraction)
        for key, value in zip(BALANCE, (entropy_ratio(c), gini(c), top_share(c, n), top_share(c, n) * e / n)):
            out[key].append(float(value))
    return out


def test_bootstrap_balance_over_prompts():
    rng = np.random.default_rng(0)
    mix = rng.dirichlet(np.full(8, 0.7), size=(20, 2))  # each prompt routes with its own expert mix
    counts = np.array([[rng.multinomial(200, p) for p in layers] for layers in mix], dtype=np.uint32)
    counts[:, 1, 6:] = 0  # layer 1 has 6 experts; slots 6 and 7 are padding
    widths = [8, 6]

    def intervals(per_prompt):
        samples = bootstrap_balance(per_prompt, np.array(widths), 0.25, 400, np.random.default_rng(1))
        point = balance(per_prompt.sum(0).astype(float), np.array(widths), 0.25)
        return {key: basic_interval(point[key], samples[key]) for key in BALANCE}

    point, ci = balance_point(counts.sum(0), widths, 0.25), intervals(counts)
    for key, values in balance(counts.sum(0), np.array(widths), 0.25).items():
        np.testing.assert_allclose(values, point[key], rtol=1e-12, err_msg=key)
    for key in BALANCE:
        lo, hi = ci[key]
        assert (lo <= point[key]).all() and (point[key] <= hi).all() and (hi - lo > 0.01).all(), key
    # the same routing over 10x the prompts: the interval narrows (about 1/sqrt(10))
    repeated = intervals(np.tile(counts, (10, 1, 1)))
    np.testing.assert_allclose(balance_point(np.tile(counts, (10, 1, 1)).sum(0), widths, 0.25)["gini"], point["gini"])
    for key in BALANCE:
        assert (np.diff(repeated[key], axis=0) < 0.6 * np.diff(ci[key], axis=0)).all(), key
    # every prompt routes identically: every resample is the same, the interval has zero width
    same = intervals(np.repeat(counts[:1], 15, axis=0))
    one = balance_point(counts[0], widths, 0.25)
    for key in BALANCE:
        np.testing.assert_allclose(same[key], [one[key], one[key]], rtol=1e-12, err_msg=key)
    assert same["entropy_ratio"][0, 1] != pytest.approx(entropy_ratio(counts[0, 1]))  # padding is no expert


def test_bootstrap_interval_covers_the_population_value():
    """Prompts drawn from a known population of per-prompt expert mixes (the scenario of
    benchmarks/bootstrap_coverage.py, 64 experts, 30 prompts): the 95 % interval should cover the
    population's balance (from 20 000 prompts) most of the time (about 90 % here: the bootstrap is
    a little optimistic at 30 prompts). The plain percentile interval does not (entropy and Gini of
    pooled counts are biased, and the resamples add the bias again), which is why `analyse` uses
    the basic interval."""
    path = Path(__file__).parents[1] / "benchmarks" / "bootstrap_coverage.py"
    spec = importlib.util.spec_from_file_location("bootstrap_coverage", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = benchmark.coverage(experts=64, prompts=30, spread=30, trials=40)
    for key in ("entropy_ratio", "gini"):
        basic, percentile = result[key]
        assert basic >= 0.8 and percentile <= 0.6, (key, basic, percentile)


def test_analyse_a_real_profile(profiled):
    _, profile = profiled
    a = analyse(profile, StatsOptions(bootstrap=50, orderings=20, splits=5))
    counts = profile.counters["selections"].sum((0, 1))
    assert [x["dead"] for x in a.layers] == (counts == 0).sum(1).tolist()
    np.testing.assert_allclose(np.nansum(a.share, 1), 1)
    for row, x in enumerate(a.layers):
        assert x["entropy_ratio"] == pytest.approx(entropy_ratio(counts[row]), abs=1e-4)
        assert x["gini"] == pytest.approx(gini(counts[row]), abs=1e-4)
        assert sum(x["tiers"].values()) == x["num_experts"] == 8
        assert x["touched_ci"][0] <= x["touched"] <= x["touched_ci"][1]
        for key in BALANCE:
            assert x[f"{key}_ci"][0] <= x[key] <= x[f"{key}_ci"][1], key
        assert 0 <= x["topk_entropy"] <= x["topk_entropy_max"] + 1e-9
        assert "clusters" in x
    for x in [*a.layers, a.summary]:  # dead = truly unused + used but not yet seen, both with intervals
        assert x["unused"] + x["unseen"] == pytest.approx(x["dead"], abs=1e-3)
        assert 0 <= x["unused_ci"][0] <= x["unused"] <= x["unused_ci"][1] <= x["dead"]
        assert x["unused_ci"] == pytest.approx([x["dead"] - x["unseen_ci"][1], x["dead"] - x["unseen_ci"][0]], abs=1e-3)
    assert a.summary["prompts"] == 12 and not a.missing
    for key, (lo, hi) in a.summary["mean_ci"].items():
        assert lo <= a.summary["mean"][key] <= hi and hi > lo, key
    assert a.curve["dead_mean"][[0, -1]] == pytest.approx([16, a.summary["dead"]])
    json.dumps(a.to_json())


def test_bad_input(profiled, tmp_path):
    _, profile = profiled
    empty = Profile.empty(profile.model, profile.layers, profile.settings, ["prose"], ["en"])
    with pytest.raises(MoescopeError, match="no tokens"):
        analyse(empty)
    for options in (StatsOptions(near_dead=-1), StatsOptions(coverage=1.0), StatsOptions(bootstrap=0)):
        with pytest.raises(MoescopeError, match="out of range"):
            analyse(profile, options)
    empty.save(tmp_path / "empty")
    assert main(["stats", str(tmp_path / "empty")]) == 2


def test_missing_optional_data_is_named(profiled):
    _, profile = profiled
    keep = {k: v for k, v in profile.counters.items() if k != "coactivation"}
    one_prompt = Profile(profile.model, profile.layers, profile.settings, profile.domains, profile.langs,
                         profile.prompts[:1], {**keep, "presence": keep["presence"][:1],
                                               "prompt_tokens": keep["prompt_tokens"][:1],
                                               "prompt_counts": keep["prompt_counts"][:1]})
    a = analyse(one_prompt)
    assert any("co-activation" in m for m in a.missing) and any("1 prompt" in m for m in a.missing)
    assert a.npmi is None and a.curve == {} and "clusters" not in a.layers[0]


def test_stats_cli_tables_and_json(profiled, capsys):
    path, _ = profiled
    assert main(["stats", str(path), "--bootstrap", "20", "--orderings", "10"]) == 0
    out = capsys.readouterr().out
    assert "load per MoE layer" in out and "Not yet seen" in out and "95 % bootstrap intervals over prompts" in out
    assert main(["stats", str(path), "--json", "--orderings", "10"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["prompts"] == 12 and len(data["layers"]) == 2
    assert set(data["summary"]["mean_ci"]) == {"entropy_ratio", "gini", "top_ratio"}
    assert all(x["gini_ci"][0] <= x["gini"] <= x["gini_ci"][1] for x in data["layers"])
    assert main(["stats", str(path), "--critical", "0.1"]) == 2
    assert "out of range" in capsys.readouterr().err
