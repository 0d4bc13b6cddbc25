"""The profiler against brute force: counters recounted from the Parquet trace, merge of shards,
kill-and-resume, phases and padding, and the CLI's refusals."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import WORDS, interrupt_profiling, successor_model, tokenizer, write_calibration

from moescope.calibration import load_calibration
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.models.tiny import tiny_model
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import FIXED_SCALE, HIST_EDGES, PHASES, Profile


def run(model, prompts, out, **options) -> Profile:
    return profile_model(model, tokenizer(), prompts, out, ProfileOptions(progress=False, **options))


def assert_same(a: Profile, b: Profile) -> None:
    assert a.prompts == b.prompts and a.domains == b.domains and a.langs == b.langs
    assert a.calibration_hash == b.calibration_hash
    assert set(a.counters) == set(b.counters)
    for name in a.counters:
        np.testing.assert_array_equal(a.counters[name], b.counters[name], err_msg=name)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_counters_equal_a_recount_of_the_trace(tmp_path, tiny, model_type):
    prompts = write_calibration(tmp_path / "cal.jsonl")
    profile = run(tiny(model_type), prompts, tmp_path / "p", generate=3, batch_size=4, coactivation=True,
                  trace=str(tmp_path / "t.parquet"))
    t = pq.read_table(tmp_path / "t.parquet").to_pydict()
    t = {k: np.array(v) for k, v in t.items()}
    layer_row = {layer["layer"]: i for i, layer in enumerate(profile.layers)}
    P, L, E = len(PHASES), len(profile.layers), profile.num_experts
    phase = np.array([PHASES.index(x) for x in t["phase"]])
    layer = np.array([layer_row[x] for x in t["layer"]])
    prompt = np.array([[p["id"] for p in profile.prompts].index(x) for x in t["prompt_id"]])
    domain = np.array([profile.domains.index(profile.prompts[i]["domain"]) for i in prompt])
    lang = np.array([profile.langs.index(profile.prompts[i]["lang"]) for i in prompt])
    expert, w = t["expert"].astype(int), t["weight"]

    def recount(*index, shape):
        return np.bincount(np.ravel_multi_index(index, shape), minlength=int(np.prod(shape))).reshape(shape)

    def fixed_sum(values):
        out = np.zeros((P, L, E), np.int64)
        np.add.at(out, (phase, layer, expert), np.round(values * FIXED_SCALE).astype(np.int64))
        return out

    c = profile.counters
    np.testing.assert_array_equal(c["selections"], recount(phase, domain, layer, expert, shape=(P, 3, L, E)))
    np.testing.assert_array_equal(c["lang_selections"], recount(phase, lang, layer, expert, shape=(P, 2, L, E)))
    np.testing.assert_array_equal(c["weight_sum"], fixed_sum(w.astype(np.float64)))
    np.testing.assert_array_equal(c["weight_sq"], fixed_sum(w.astype(np.float64) ** 2))
    bins = np.searchsorted(HIST_EDGES.astype(np.float32), w, side="right")
    np.testing.assert_array_equal(c["weight_hist"], recount(phase, layer, expert, bins, shape=c["weight_hist"].shape))
    first = (t["rank"] == 0) & (layer == 0)  # one row per token
    np.testing.assert_array_equal(c["tokens"], recount(phase[first], domain[first], shape=(P, 3)))
    np.testing.assert_array_equal(c["prompt_tokens"], recount(prompt[first], phase[first], shape=(len(prompts), P)))
    presence = recount(prompt, phase, layer, expert, shape=(len(prompts), P, L, E)) > 0
    np.testing.assert_array_equal(c["prompt_counts"], recount(prompt, layer, expert, shape=(len(prompts), L, E)))
    assert c["prompt_counts"].dtype == np.uint32
    assert all((profile.presence_of(i) == presence[i]).all() for i in range(len(prompts)))
    token = np.ravel_multi_index((prompt, phase, t["position"]), (len(prompts), P, 1000))
    order = np.lexsort((t["rank"], layer, token))
    ids = expert[order].reshape(-1, 2)  # top-2: consecutive ranks of one token and layer
    weights = w[order].astype(np.float64).reshape(-1, 2)
    pair_phase, pair_layer = phase[order][::2], layer[order][::2]
    coactivation = recount(np.repeat(pair_phase, 4), np.repeat(pair_layer, 4), np.repeat(ids, 2, axis=1).ravel(),
                           np.tile(ids, 2).ravel(), shape=(P, L, E, E))
    np.testing.assert_array_equal(c["coactivation"], coactivation)
    share = weights / weights.sum(1, keepdims=True)
    entropy = np.zeros((P, L))
    np.add.at(entropy, (pair_phase, pair_layer), -(share * np.log(share)).sum(1))
    np.testing.assert_allclose(profile.real("entropy_sum"), entropy, rtol=1e-6)
    assert Profile.load(tmp_path / "p").calibration_hash == profile.calibration_hash


def test_merge_of_shards_equals_the_whole(tmp_path, tiny):
    model = tiny("olmoe")
    whole = write_calibration(tmp_path / "all.jsonl", 8)
    a, b = whole[:6], whole[6:]  # cut on a batch boundary, so the same batches run; b has no "code"
    assert "code" not in {p.domain for p in b}
    options = dict(generate=2, batch_size=3, coactivation=True)
    merged = run(model, a, tmp_path / "a", **options).merge(run(model, b, tmp_path / "b", **options))
    assert_same(merged, run(model, whole, tmp_path / "all", **options))  # per-prompt counts included
    assert merged.counters["prompt_counts"].shape[0] == 8 and merged.counters["prompt_counts"][6:].sum() > 0
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    assert_same(Profile.load(tmp_path / "m"), merged)


def test_killed_and_resumed_equals_uninterrupted(tmp_path, tiny, monkeypatch):
    model = tiny("qwen3_moe")
    prompts = write_calibration(tmp_path / "cal.jsonl", 9)
    options = dict(generate=2, batch_size=2, checkpoint_every=2, saliency=True)
    whole = run(model, prompts, tmp_path / "whole", trace=str(tmp_path / "whole.parquet"), **options)

    run_whole = interrupt_profiling(monkeypatch, after_batches=3)
    with pytest.raises(KeyboardInterrupt):
        run(model, prompts, tmp_path / "p", trace=str(tmp_path / "p.parquet"), **options)
    run_whole()
    assert not (tmp_path / "p").exists() and (tmp_path / "p.partial" / "progress.json").exists()
    with pytest.raises(MoescopeError, match="--resume"):
        run(model, prompts, tmp_path / "p", **options)
    resumed = run(model, prompts, tmp_path / "p", resume=True, trace=str(tmp_path / "p.parquet"), **options)
    assert_same(resumed, whole)
    assert_same(Profile.load(tmp_path / "p"), whole)
    assert pq.read_table(tmp_path / "p.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == ["profile.json", "stats.safetensors"]


def test_generation_counted_in_generation_phase_only(tmp_path, tiny):
    model = tiny("qwen3_moe")
    prompts = write_calibration(tmp_path / "cal.jsonl", 6)
    prefill_only = run(model, prompts, tmp_path / "a", batch_size=3)
    generated = run(model, prompts, tmp_path / "b", batch_size=3, generate=4)
    for name in ("selections", "tokens", "weight_sum", "weight_hist", "entropy_sum"):
        np.testing.assert_array_equal(generated.counters[name][0], prefill_only.counters[name][0])
        assert prefill_only.counters[name][1].sum() == 0
    per_prompt = generated.counters["prompt_tokens"][:, 1]
    assert (per_prompt >= 1).all() and (per_prompt <= 4).all() and per_prompt.sum() > len(prompts)
    assert generated.counters["tokens"][1].sum() == per_prompt.sum()


def test_a_row_stops_after_its_end_of_text(tmp_path):
    """A model whose greedy answer is known in advance (each word is followed by the next, the last word
    by end-of-text): each prompt's generation tokens are those up to and including its end-of-text."""
    end, first, last = 2, 3, 2 + len(WORDS)  # helpers.tokenizer: "</s>" = 2, then the words
    model = successor_model({t: t + 1 for t in range(first, last)} | {last: end}, 32, end)
    model.generation_config.eos_token_id = end
    prompts = write_calibration(tmp_path / "cal.jsonl", 9)
    generate = 8
    expected = []
    for p in prompts:
        token = tokenizer()(p.text)["input_ids"][-1]
        answer = []
        while len(answer) < generate and (not answer or answer[-1] != end):
            token = model.lm_head.weight[:, token].argmax().item()
            answer.append(token)
        expected.append(len(answer))
    assert min(expected) < generate == max(expected)  # some rows end early, some do not
    profile = run(model, prompts, tmp_path / "p", batch_size=9, generate=generate)
    assert profile.counters["prompt_tokens"][:, 1].tolist() == expected
    top_k, layers = 2, len(profile.layers)
    assert profile.counters["selections"][1].sum() == sum(expected) * top_k * layers


def test_padding_is_not_counted(tmp_path, tiny):
    model = tiny("qwen3_moe")
    prompts = write_calibration(tmp_path / "cal.jsonl", 6)
    lengths = [len(tokenizer()(p.text)["input_ids"]) for p in prompts]
    padded = run(model, prompts, tmp_path / "a", batch_size=6, trace=str(tmp_path / "t.parquet"))
    single = run(model, prompts, tmp_path / "b", batch_size=1)
    assert padded.counters["prompt_tokens"][:, 0].tolist() == lengths
    np.testing.assert_array_equal(padded.counters["tokens"], single.counters["tokens"])
    t = pq.read_table(tmp_path / "t.parquet").to_pydict()
    for p, n in zip(prompts, lengths, strict=True):
        seen = {pos for pid, pos in zip(t["prompt_id"], t["position"], strict=True) if pid == p.id}
        assert seen == set(range(n))


def test_cli_profiles_and_refuses_an_existing_directory(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    write_calibration(tmp_path / "cal.jsonl", 4)
    args = ["profile", str(model_dir), "--calibration", str(tmp_path / "cal.jsonl"), "--out", str(tmp_path / "p"),
            "--batch-size", "2", "--generate", "2", "--domains", "math,code"]
    assert main(args) == 0
    profile = Profile.load(tmp_path / "p")
    assert profile.domains == ["code", "math"] and profile.settings["generate"] == 2
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--resume"]) == 0  # already complete: nothing to do
    assert main([*args, "--overwrite", "--no-prompt-counts"]) == 0
    assert "prompt_counts" not in Profile.load(tmp_path / "p").counters


def test_prompts_are_cut_to_the_model_context(tmp_path, tiny):
    model = tiny("qwen3_moe")
    context = model.config.max_position_embeddings
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "domain": "code", "lang": "en", "text": "alpha " * (context + 40)}))
    profile = run(model, load_calibration(path), tmp_path / "p", generate=2)
    assert profile.prompts[0]["truncated"]
    assert profile.counters["prompt_tokens"][0, 0] == context - 2  # prefill leaves room for the 2 new tokens
    assert profile.settings["max_tokens"] == context - 2
    with pytest.raises(MoescopeError, match="--generate"):
        run(model, load_calibration(path), tmp_path / "q", generate=context)


def test_merge_all_equals_merging_one_by_one(tmp_path, tiny):
    """The binary-counter merge (Ray shards, ingest chunks) keeps prompt order for any count of parts."""
    from functools import reduce

    from moescope.profiling.store import merge_all

    prompts = write_calibration(tmp_path / "cal.jsonl", count=7)
    parts = [run(tiny("qwen3_moe"), [p], tmp_path / f"p{i}") for i, p in enumerate(prompts)]
    for n in range(1, 8):
        assert_same(merge_all(iter(parts[:n])), reduce(Profile.merge, parts[:n]))
    with pytest.raises(MoescopeError, match="nothing to merge"):
        merge_all([])
