"""lm-evaluation-harness on the in-memory model: a multiple-choice task defined here, on local data,
scored by lm-eval and recomputed by hand from the model's own log-likelihoods; without the extra,
one line saying how to install it."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from helpers import WORDS, save_with_tokenizer, tokenizer

from moescope.cli import main
from moescope.judge.bench import hub_offline
from moescope.models.tiny import tiny_model

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval not installed (pip install 'moescope[eval]')")

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


def write_task(tasks):
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=tasks / "items.jsonl"))
    return tasks


@needs_lm_eval
def test_tiny_task_matches_a_hand_count(tmp_path, capsys):
    model = tiny_model("qwen3_moe", vocab_size=64)
    save_with_tokenizer(model, tmp_path / "model")
    tasks = write_task(tmp_path / "tasks")
    args = ["bench", str(tmp_path / "model"), "--tasks", "tiny_mc", "--include-path", str(tasks), "--json",
            str(tmp_path / "bench.json"), "--dtype", "float32", "--device", "auto"]  # auto: the CPU here
    assert main(args) == 0
    assert "tiny_mc" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    accuracy = result["results"]["tiny_mc"]["acc,none"]
    tok = tokenizer()
    expected = sum(max(range(3), key=lambda c: choice_logprob(model, tok, item["question"], item["choices"][c]))
                   == item["answer"] for item in ITEMS) / len(ITEMS)
    assert accuracy == pytest.approx(expected)
    assert result["samples"]["tiny_mc"]["effective"] == len(ITEMS)


@needs_lm_eval
def test_unknown_task_is_refused(tmp_path, capsys):
    """A task missing from --include-path is looked for among the built-in ones too, then refused by name."""
    save_with_tokenizer(tiny_model("qwen3_moe", vocab_size=64), tmp_path / "model")
    tasks = write_task(tmp_path / "tasks")
    args = ["bench", str(tmp_path / "model"), "--tasks", "tiny_mc,no_such_task_here", "--include-path", str(tasks)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) no_such_task_here:" in err and "tiny_mc" not in err


def test_missing_extra_says_how_to_install(tmp_path, monkeypatch, capsys):
    save_with_tokenizer(tiny_model("qwen3_moe", vocab_size=64), tmp_path / "model")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees without the extra
    capsys.readouterr()
    assert main(["bench", str(tmp_path / "model"), "--tasks", "tiny_mc"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'moescope[eval]'" in err and len(err.strip().splitlines()) == 1


def test_hub_modules_imported_earlier_are_switched_offline(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: transformers has imported it long
    before `bench` runs, so setting the variable alone would leave hub requests on."""
    import huggingface_hub
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    if importlib.util.find_spec("datasets") is not None:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    hub_offline()
    assert hub.HF_HUB_OFFLINE
    with pytest.raises(huggingface_hub.errors.OfflineModeIsEnabled):  # refused before any connection
        huggingface_hub.HfApi().model_info("Qwen/Qwen3-30B-A3B")
    if importlib.util.find_spec("datasets") is not None:
        assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE
