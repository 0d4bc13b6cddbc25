"""Per-expert accuracy: the counts equal an independent recount (plain forward passes per choice,
routing re-derived from the router logits of the question alone), the Wilson interval matches a
hand value, bad items are refused with file:line, and the report draws the section."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import WORDS, save_with_tokenizer, tokenizer

from moescope.analysis.accuracy import load_accuracy, wilson
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.judge.accuracy import expert_accuracy, load_items
from moescope.models.layout import text_config
from moescope.models.registry import find_moe_layers
from moescope.models.tiny import tiny_model
from moescope.profiling.run import ProfileOptions, profile_model

DOMAINS = ("prose", "math")


def write_items(path, count: int = 12) -> None:
    rows = [{"id": f"q{i}", "domain": DOMAINS[i % 2], "lang": "en", "text": " ".join(WORDS[i % 9: i % 9 + 3 + i % 4]),
             "choices": [WORDS[(i + s) % len(WORDS)] for s in (4, 7, 11)], "answer": i % 3} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recount(model, items):
    """Right/wrong by scoring each choice alone; experts from the router's logits on the question alone."""
    tok = tokenizer()
    layers = find_moe_layers(model)
    totals = {layer.index: np.zeros(layer.num_experts, int) for layer in layers}
    corrects = {layer.index: np.zeros(layer.num_experts, int) for layer in layers}
    right = 0
    for item in items:
        context = tok(item.prompt.text)["input_ids"]
        scores = []
        for choice in item.choices:
            ending = tok(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([context + ending])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[len(context) + i - 1, t]) for i, t in enumerate(ending)))
        ok = int(np.argmax(scores)) == item.answer
        right += ok
        logits = {}

        def keep(module, args, out, layer, seen=logits) -> None:
            seen[layer.index] = layer.family.router_logits(out)

        hooks = [layer.router.register_forward_hook(lambda m, a, out, layer=layer: keep(m, a, out, layer))
                 for layer in layers]
        with torch.no_grad():
            model(input_ids=torch.tensor([context]))
        for hook in hooks:
            hook.remove()
        for layer in layers:
            ids, _ = layer.family.route(logits[layer.index], layer, text_config(model.config))
            totals[layer.index][ids[-1]] += 1
            corrects[layer.index][ids[-1]] += ok
    return right, totals, corrects


def test_counts_equal_an_independent_recount(tmp_path):
    model = tiny_model("qwen3_moe")
    write_items(tmp_path / "items.jsonl")
    items = load_items(tmp_path / "items.jsonl")
    result = expert_accuracy(model, tokenizer(), items, progress=False)
    right, totals, corrects = recount(model, items)
    assert result["correct"] == right and result["items"] == len(items)
    for layer in result["layers"]:
        got = layer["experts"]
        assert [x["items"] for x in got] == totals[layer["layer"]].tolist()
        assert [x["correct"] for x in got] == corrects[layer["layer"]].tolist()
        assert sum(x["items"] for x in got) == len(items) * model.config.num_experts_per_tok


def test_wilson_interval_matches_hand_values():
    low, high = wilson(np.array([8, 0, 5]), np.array([10, 4, 0]))
    assert low[0] == pytest.approx(0.4902, abs=1e-4) and high[0] == pytest.approx(0.9433, abs=1e-4)
    assert low[1] == pytest.approx(0.0, abs=1e-12) and high[1] == pytest.approx(0.4899, abs=1e-4)
    assert np.isnan(low[2]) and np.isnan(high[2])


@pytest.mark.parametrize("change, message", [
    ({"choices": ["one"]}, "'choices' must be a list of two or more"),
    ({"choices": None}, "'choices' must be a list of two or more"),
    ({"answer": 3}, "'answer' must be the index of the right choice, 0 to 2"),
    ({"answer": True}, "'answer' must be the index"),
    ({"text": None}, "give exactly one of 'text' or 'messages'"),
])
def test_bad_items_name_file_and_line(tmp_path, change, message):
    write_items(tmp_path / "items.jsonl", 3)
    rows = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    rows[1].update(change)
    rows[1] = {k: v for k, v in rows[1].items() if v is not None}
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MoescopeError, match=f"items.jsonl:2: {message}"):
        load_items(tmp_path / "items.jsonl")


def test_cli_and_report_section(tmp_path, capsys):
    model = tiny_model("qwen3_moe")
    save_with_tokenizer(model, tmp_path / "model")
    write_items(tmp_path / "items.jsonl", 24)
    assert main(["accuracy", str(tmp_path / "model"), "--items", str(tmp_path / "items.jsonl"),
                 "--out", str(tmp_path / "acc.json")]) == 0
    result = load_accuracy(tmp_path / "acc.json")
    assert f"of {result['items']} items right" in capsys.readouterr().out
    prompts = [item.prompt for item in load_items(tmp_path / "items.jsonl")]
    profile_model(model, tokenizer(), prompts, tmp_path / "profile", ProfileOptions(progress=False))
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "profile"), "--out", str(out), "--accuracy", str(tmp_path / "acc.json"),
                 "--bootstrap", "20", "--orderings", "10"]) == 0
    text = out.read_text()
    assert "<h2>Accuracy per expert</h2>" in text
    busy = max(result["layers"][0]["experts"], key=lambda x: x["items"])
    assert f"expert {busy['expert']}: {busy['correct']} of {busy['items']} right" in text
    (tmp_path / "other.json").write_text('{"kind": "bit_plan"}')
    other = ["report", str(tmp_path / "profile"), "--out", str(out), "--accuracy", str(tmp_path / "other.json"),
             "--overwrite"]
    assert main(other) == 2
    assert "is not a `moescope accuracy` file" in capsys.readouterr().err
