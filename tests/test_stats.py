"""Profile store: save/load round trip, merge by name, refusals that name the difference, corrupt files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.profiling.store import HIST_BINS, Profile

MODEL = {"model_type": "qwen3_moe", "config_hash": "abc", "source": "x"}
LAYERS = [{"layer": i, "path": f"model.layers.{i}.mlp", "num_experts": 10, "top_k": 2,
           "router_family": "softmax_topk"} for i in range(3)]
SETTINGS = {"dtype": "float32", "generate": 0, "max_tokens": 64}


def fake(prompts: list[tuple[str, str, str]], seed: int = 0, **changes) -> Profile:
    """A profile whose counters come from random top-2 routing of random-length prompts."""
    rng = np.random.default_rng(seed)
    profile = Profile.empty(changes.get("model", MODEL), changes.get("layers", LAYERS),
                            changes.get("settings", SETTINGS), sorted({p[1] for p in prompts}),
                            sorted({p[2] for p in prompts}), coactivation=changes.get("coactivation", False),
                            prompt_counts=True)
    c = profile.counters
    presence, prompt_tokens, prompt_counts = [], [], []
    for pid, domain, lang in prompts:
        d, g, n = profile.domains.index(domain), profile.langs.index(lang), int(rng.integers(1, 20))
        touched = np.zeros((2, 3, 10), bool)
        counts = np.zeros((3, 10), np.uint32)
        for layer in range(3):
            ids = rng.random((n, 10)).argsort(1)[:, :2]
            weights = rng.random((n, 2))
            np.add.at(c["selections"][0, d, layer], ids.ravel(), 1)
            np.add.at(c["lang_selections"][0, g, layer], ids.ravel(), 1)
            np.add.at(c["weight_sum"][0, layer], ids.ravel(), (weights.ravel() * 2**24).astype(np.int64))
            np.add.at(c["weight_hist"][0, layer], (ids.ravel(), rng.integers(0, HIST_BINS, ids.size)), 1)
            touched[0, layer, ids.ravel()] = True
            np.add.at(counts[layer], ids.ravel(), 1)
        c["tokens"][0, d] += n
        c["lang_tokens"][0, g] += n
        presence.append(np.packbits(touched, axis=-1, bitorder="little"))
        prompt_tokens.append([n, 0])
        prompt_counts.append(counts)
        profile.prompts.append({"id": pid, "domain": domain, "lang": lang, "hash": pid * 3, "truncated": False})
    c["presence"] = np.array(presence, np.uint8).reshape(len(prompts), 2, 3, 2)
    c["prompt_tokens"] = np.array(prompt_tokens, np.int64).reshape(len(prompts), 2)
    c["prompt_counts"] = np.array(prompt_counts, np.uint32).reshape(len(prompts), 3, 10)
    return profile


A = [("a1", "math", "en"), ("a2", "prose", "de")]
B = [("b1", "code", "en"), ("b2", "math", "fr")]


def assert_same(a: Profile, b: Profile) -> None:
    assert (a.model, a.layers, a.settings, a.domains, a.langs, a.prompts) == \
        (b.model, b.layers, b.settings, b.domains, b.langs, b.prompts)
    assert set(a.counters) == set(b.counters)
    for name in a.counters:
        np.testing.assert_array_equal(a.counters[name], b.counters[name], err_msg=name)


def test_save_load_round_trip(tmp_path):
    profile = fake(A + B, coactivation=True)
    profile.check()
    profile.save(tmp_path / "p")
    loaded = Profile.load(tmp_path / "p")
    assert_same(loaded, profile)
    meta = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert meta["format_version"] == 1 and meta["counts"]["tokens"]["prefill"] == profile.counters["tokens"].sum()
    assert meta["calibration_hash"] == profile.calibration_hash
    assert (profile.presence_of(0)[0].sum(-1) >= 2).all()


def test_merge_aligns_domains_and_languages_by_name():
    a, b = fake(A, seed=1), fake(B, seed=2)
    merged = a.merge(b)
    merged.check()
    assert merged.domains == ["code", "math", "prose"] and merged.langs == ["de", "en", "fr"]
    math = merged.domains.index("math")
    np.testing.assert_array_equal(merged.counters["selections"][:, math],
                                  a.counters["selections"][:, a.domains.index("math")]
                                  + b.counters["selections"][:, b.domains.index("math")])
    assert [p["id"] for p in merged.prompts] == ["a1", "a2", "b1", "b2"]
    np.testing.assert_array_equal(merged.counters["presence"][2:], b.counters["presence"])
    np.testing.assert_array_equal(merged.counters["prompt_counts"],
                                  np.concatenate([a.counters["prompt_counts"], b.counters["prompt_counts"]]))
    np.testing.assert_array_equal(merged.counters["weight_sum"], a.counters["weight_sum"] + b.counters["weight_sum"])
    assert_same(a.merge(b).merge(fake([("c", "math", "en")])), a.merge(b.merge(fake([("c", "math", "en")]))))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {**MODEL, "model_type": "olmoe"}}, "different models: model_type qwen3_moe vs olmoe"),
        ({"model": {**MODEL, "config_hash": "def"}}, "different models: config_hash abc vs def"),
        ({"layers": [{**LAYERS[0], "top_k": 4}, *LAYERS[1:]]}, "different MoE layers"),
        ({"settings": {**SETTINGS, "generate": 8}}, "different settings: generate 0 vs 8"),
        ({"coactivation": True}, "only one profile has coactivation"),
    ],
)
def test_mismatched_merges_name_the_difference(changes, message):
    with pytest.raises(MoescopeError, match=message):
        fake(A).merge(fake(B, **changes))


def test_merge_refuses_a_prompt_counted_twice():
    with pytest.raises(MoescopeError, match="prompt 'a1' is in both profiles"):
        fake(A).merge(fake(A[:1] + B))


def test_check_catches_missing_selections():
    profile = fake(A)
    profile.counters["selections"][0, 0, 1, 3] -= 1
    with pytest.raises(MoescopeError, match="layer 1 \\(prefill\\) has"):
        profile.check()


def test_check_catches_per_prompt_counts_that_do_not_add_up():
    profile = fake(A)
    profile.check()
    profile.counters["prompt_counts"][1, 2, 0] += 1
    with pytest.raises(MoescopeError, match="per-prompt selection counts do not add up"):
        profile.check()


def test_profile_without_prompt_counts_still_loads(tmp_path):
    """Profiles written before per-prompt counts existed have no `prompt_counts`: they load as they are."""
    old = fake(A + B)
    del old.counters["prompt_counts"]
    old.save(tmp_path / "old")
    assert "prompt_counts" not in json.loads((tmp_path / "old" / "profile.json").read_text())["counters"]
    assert_same(Profile.load(tmp_path / "old"), old)
    with pytest.raises(MoescopeError, match="only one profile has prompt_counts"):
        old.merge(fake([("c", "math", "en")]))


def test_corrupt_or_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(MoescopeError, match="is not a profile"):
        Profile.load(tmp_path)
    fake(A).save(tmp_path / "p")
    stats = tmp_path / "p" / "stats.safetensors"
    data = stats.read_bytes()
    stats.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoescopeError, match="stats.safetensors has a corrupt safetensors header.*profile again"):
        Profile.load(tmp_path / "p")
    fake(A).save(tmp_path / "q")
    meta = tmp_path / "q" / "profile.json"
    meta.write_text(meta.read_text().replace('"domains": [', '"domains": ["extra", '))
    with pytest.raises(MoescopeError, match="wrong shape"):
        Profile.load(tmp_path / "q")
    meta.write_text("{not json")
    with pytest.raises(MoescopeError, match="profile.json: invalid JSON"):
        Profile.load(tmp_path / "q")


def test_merge_cli_refuses_mismatch_in_one_line(tmp_path, capsys):
    fake(A).save(tmp_path / "a")
    fake(B, model={**MODEL, "model_type": "olmoe"}).save(tmp_path / "b")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type qwen3_moe vs olmoe" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_stats_module_does_not_import_torch():
    code = ("import sys, moescope.profiling.store, moescope.calibration, moescope.analysis.analyse, moescope.plans; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
