"""The perplexity protocol against a plain reference, and baseline comparisons on real tiny checkpoints."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import WORDS, save_with_tokenizer, tokenizer

from moescope.backends.hf.capture import capture_routing
from moescope.cli import main
from moescope.compress.prune import offsets_for, prune_checkpoint, routing_offsets
from moescope.errors import MoescopeError
from moescope.judge.evaluate import Protocol, compare_models, evaluate, expert_id_map, load_windows
from moescope.judge.nll import geometric_mean, perplexity, token_kl
from moescope.models.tiny import tiny_model
from moescope.plans import PrunePlan


def write_data(path, records: int = 30, words: int = 12):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(records):
        text = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (words,), generator=gen))
        rows.append({"id": f"e{i}", "domain": ["math", "code"][i % 2], "lang": "en", "text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_perplexity(model, windows) -> float:
    """Token by token, in float64: the textbook definition."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0].double()
            for position in range(len(row) - 1):
                total -= float(logits[position].log_softmax(-1)[row[position + 1]])
                count += 1
    return math.exp(total / count)


def test_perplexity_matches_the_reference(tmp_path):
    model = tiny_model("qwen3_moe")
    windows = load_windows(write_data(tmp_path / "d.jsonl"), tokenizer(), Protocol(seq_len=16, sequences=4), model)
    for rows in windows.values():
        assert perplexity(model, rows, batch_size=3) == pytest.approx(reference_perplexity(model, rows), rel=1e-4)


def test_windows_follow_the_protocol(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    windows = load_windows(data, tokenizer(), Protocol(seq_len=16, sequences=3, seed=1))
    assert set(windows) == {("math", "en"), ("code", "en")}
    assert all(rows.shape == (3, 16) for rows in windows.values())
    again = load_windows(data, tokenizer(), Protocol(seq_len=16, sequences=3, seed=1))
    assert all(torch.equal(windows[g], again[g]) for g in windows)
    other = load_windows(data, tokenizer(), Protocol(seq_len=16, sequences=3, seed=2))
    assert any(not torch.equal(windows[g], other[g]) for g in windows)
    long_data = write_data(tmp_path / "long.jsonl", records=60, words=20)
    clipped = load_windows(long_data, tokenizer(), Protocol(seq_len=4096, sequences=2), tiny_model("qwen3_moe"))
    assert next(iter(clipped.values())).shape[1] == 256  # the tiny model's context
    with pytest.raises(MoescopeError, match="fewer than one sequence of 1000: add at least"):
        load_windows(data, tokenizer(), Protocol(seq_len=1000))


def peaked(model, scale: float):
    """`model` with its LM head scaled by `scale`: a baseline and a candidate of different confidence
    have KL divergences that differ clearly between the two directions (for nearby distributions of
    similar entropy they agree to second order)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def test_geometric_mean_by_hand():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean(iter([1.0, 10.0, 100.0])) == pytest.approx(10.0)


def test_token_kl_is_baseline_to_candidate_by_hand():
    base = torch.tensor([0.9, 0.1]).log()
    cand = torch.tensor([0.5, 0.5]).log()
    # KL(base || cand) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5); the other direction is 0.5108
    assert float(token_kl(base, cand)) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), abs=1e-6)
    assert float(token_kl(base, cand)) == pytest.approx(0.36806, abs=1e-5)
    assert float(token_kl(cand, base)) == pytest.approx(0.51083, abs=1e-5)


def test_compare_models_scores_the_candidate_against_the_baseline(tmp_path):
    """A candidate whose LM head is the baseline's, sharpened and perturbed: KL differs clearly between the
    two directions and top-1 agreement is partial, so each is checked against a float64 recount over every
    window once (batches of 2 over 3 windows)."""
    base = peaked(tiny_model("mixtral"), 3.0)
    cand = copy.deepcopy(base)
    with torch.no_grad():
        noise = torch.randn(base.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
        cand.lm_head.weight.mul_(5).add_(noise * 2 * base.lm_head.weight.std())
    windows = load_windows(write_data(tmp_path / "d.jsonl"), tokenizer(), Protocol(seq_len=16, sequences=3))
    result = compare_models(base, cand, windows, batch_size=2)
    for group, rows in windows.items():
        with torch.no_grad():
            p = base(input_ids=rows).logits[:, :-1].double().log_softmax(-1)
            q = cand(input_ids=rows).logits[:, :-1].double().log_softmax(-1)
        forward = float((p.exp() * (p - q)).sum(-1).mean())
        backward = float((q.exp() * (q - p)).sum(-1).mean())
        assert abs(forward - backward) > 0.2 * forward  # the two directions are told apart
        assert result["groups"][group]["kl"] == pytest.approx(forward, rel=1e-4)
        agree = float((p.argmax(-1) == q.argmax(-1)).double().mean())
        assert 0.2 < agree < 0.9 and result["groups"][group]["top1_agreement"] == pytest.approx(agree)


def test_routing_drift_matches_a_recount(tmp_path):
    """Per layer, the share of tokens whose set of chosen experts differs, against a token-by-token recount
    of one capture of all windows (compare_models runs them in batches of 2)."""
    base, cand = tiny_model("qwen3_moe"), tiny_model("qwen3_moe", seed=1)
    windows = load_windows(write_data(tmp_path / "d.jsonl"), tokenizer(), Protocol(seq_len=16, sequences=3))
    drift = compare_models(base, cand, windows, batch_size=2)["routing_drift"]
    changed, seen = {}, {}
    for rows in windows.values():
        with capture_routing(base) as b, capture_routing(cand) as c, torch.no_grad():
            base(input_ids=rows)
            cand(input_ids=rows)
        for x, y in zip(b.events, c.events, strict=True):
            moved = [set(p) != set(q) for p, q in zip(x.expert_ids.tolist(), y.expert_ids.tolist(), strict=True)]
            changed[x.layer] = changed.get(x.layer, 0) + sum(moved)
            seen[x.layer] = seen.get(x.layer, 0) + len(moved)
    assert drift == pytest.approx({layer: changed[layer] / seen[layer] for layer in seen})
    assert all(0 < share < 1 for share in drift.values())


def test_a_model_against_itself_has_no_drift(tmp_path):
    model = tiny_model("olmoe")
    windows = load_windows(write_data(tmp_path / "d.jsonl"), tokenizer(), Protocol(seq_len=16, sequences=2))
    result = compare_models(model, model, windows)
    assert all(g["kl"] == pytest.approx(0, abs=1e-9) and g["top1_agreement"] == 1 for g in result["groups"].values())
    assert set(result["routing_drift"].values()) == {0.0}


def test_removed_experts_are_mapped_back_for_drift(tmp_path):
    model = tiny_model("qwen3_moe")
    save_with_tokenizer(model, tmp_path / "base")
    plan = PrunePlan(model={"model_type": "qwen3_moe"}, num_experts={0: 8, 1: 8}, top_k=2, prune={0: [1, 4], 1: [0, 6]})
    out = prune_checkpoint(tmp_path / "base", tmp_path / "removed", plan, "remove")
    from moescope.backends.hf.loading import load_model

    removed = load_model(out, dtype="float32")
    windows = load_windows(write_data(tmp_path / "d.jsonl"), tokenizer(), Protocol(seq_len=16, sequences=3))
    structural = compare_models(model, removed, windows, id_map=expert_id_map(out))
    model_copy = load_model(tmp_path / "base", dtype="float32")
    with routing_offsets(model_copy, offsets_for(plan)):
        runtime = compare_models(model, model_copy, windows)
    for layer, share in runtime["routing_drift"].items():
        assert structural["routing_drift"][layer] == pytest.approx(share, abs=1e-9)
    assert 0 < structural["routing_drift"][0] <= 1


def test_different_tokenizers_are_refused(tmp_path):
    save_with_tokenizer(tiny_model("mixtral"), tmp_path / "base")
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "cand")
    other = tokenizer()
    other.add_tokens(["zebra"])
    other.save_pretrained(tmp_path / "cand")
    data = write_data(tmp_path / "d.jsonl")
    with pytest.raises(MoescopeError, match="tokenizers differ: vocabulary sizes differ"):
        evaluate(str(tmp_path / "cand"), Protocol(seq_len=16, sequences=2), str(data), str(tmp_path / "base"))


def test_cli_json_with_baseline(tmp_path, capsys):
    save_with_tokenizer(tiny_model("mixtral"), tmp_path / "base")
    save_with_tokenizer(tiny_model("mixtral", seed=1), tmp_path / "cand")
    data = write_data(tmp_path / "d.jsonl")
    assert main(["evaluate", str(tmp_path / "cand"), "--baseline", str(tmp_path / "base"), "--data", str(data),
                 "--seq-len", "16", "--sequences", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["groups"]) == {"math/en", "code/en"}
    row = report["groups"]["math/en"]
    assert row["ratio"] == pytest.approx(row["perplexity"] / row["baseline_perplexity"])
    assert row["kl"] > 0 and set(report["routing_drift"]) == {"0", "1"}
