"""lm-evaluation-harness on the in-memory model: a multiple-choice task defined here, on local data,
scored by lm-eval and recomputed by hand from the model's own log-likelihoods."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import WORDS, save_with_tokenizer, tokenizer

from moescope.cli import main
from moescope.tiny import tiny_model

pytest.importorskip("lm_eval")

ITEMS = [{"question": " ".join(WORDS[i:i + 4]), "choices": [WORDS[(i + step) % 20] for step in (5, 9, 13)],
          "answer": i % 3} for i in range(7)]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def choice_logprob(model, tok, question: str, choice: str) -> float:
    context = tok(question)["input_ids"]
    whole = tok(f"{question} {choice}")["input_ids"]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole)))


def test_tiny_task_matches_a_hand_count(tmp_path, capsys):
    model = tiny_model("qwen3_moe", vocab_size=64)
    save_with_tokenizer(model, tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=tasks / "items.jsonl"))
    args = ["bench", str(tmp_path / "model"), "--tasks", "tiny_mc", "--include-path", str(tasks), "--json",
            str(tmp_path / "bench.json"), "--dtype", "float32"]
    assert main(args) == 0
    assert "tiny_mc" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    accuracy = result["results"]["tiny_mc"]["acc,none"]
    tok = tokenizer()
    expected = sum(max(range(3), key=lambda c: choice_logprob(model, tok, item["question"], item["choices"][c]))
                   == item["answer"] for item in ITEMS) / len(ITEMS)
    assert accuracy == pytest.approx(expected)
    assert result["samples"]["tiny_mc"]["effective"] == len(ITEMS)


def test_unknown_task_is_refused(tmp_path, capsys):
    save_with_tokenizer(tiny_model("qwen3_moe", vocab_size=64), tmp_path / "model")
    assert main(["bench", str(tmp_path / "model"), "--tasks", "no_such_task_here"]) == 2
    assert "unknown lm-eval task(s) no_such_task_here" in capsys.readouterr().err
