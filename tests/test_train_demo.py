"""The demo training script trains a micro MoE from scratch in seconds and its loss falls.

The corpus under data/ is not shipped, so the test writes a small one from the shipped calibration
set (training on it is fine for a smoke test: nothing is evaluated on it).
"""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_demo_model.py"
ASSETS = ROOT / "moescope" / "assets"


def load_script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_micro_training_loss_falls(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    calib = ASSETS / "calibration.jsonl"
    if not calib.exists():
        pytest.skip("moescope/assets/calibration.jsonl not built yet (scripts/build_corpus.py)")
    mod = load_script()
    texts: dict[str, list[str]] = defaultdict(list)
    for line in calib.read_text().splitlines():
        rec = json.loads(line)
        text = rec.get("text") or "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                                          for m in rec["messages"])
        texts[f"{rec['domain']}-{rec['lang']}"].append(text)
    (tmp_path / "corpus" / "train").mkdir(parents=True)
    for name, docs in texts.items():
        (tmp_path / "corpus" / "train" / f"{name}.txt").write_text(mod.SEP.join(docs))
    out = tmp_path / "model"
    result = mod.main(["--tiny", "--corpus", str(tmp_path / "corpus"), "--out", str(out), "--steps", "80",
                       "--vocab", "512", "--lr", "3e-3", "--threads", "1", "--log-every", "1000"])
    hist = result["history"]
    assert len(hist) == 80
    assert np.mean(hist[-10:]) < np.mean(hist[:10]) - 0.5, hist
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert "num_experts" in config and "rope_theta" in config and "num_local_experts" not in config

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen3_moe" and len(tok) == model.config.vocab_size
    report = mod.evaluate(str(out), max_seqs=1)  # the --evaluate tables the datasheet quotes
    assert "Held-out loss, mean over the 12 files:" in report and "| layer | dead | entropy ratio" in report


def test_balance_loss_is_per_layer() -> None:
    """The balance loss is 1.0 for a perfectly even router and larger when one layer collapses."""
    import torch

    mod = load_script()
    hooks = mod.BalanceHooks.__new__(mod.BalanceHooks)
    even_idx = torch.arange(8).repeat(4).reshape(-1, 2)
    collapsed = torch.zeros(16, 2, dtype=torch.long)
    hooks.seen = [(torch.zeros(16, 8), even_idx), (torch.zeros(16, 8), even_idx)]
    assert hooks.loss().item() == pytest.approx(1.0)
    logits = torch.zeros(16, 8)
    logits[:, 0] = 10.0
    hooks.seen = [(torch.zeros(16, 8), even_idx), (logits, collapsed)]
    assert hooks.loss().item() > 2.0
