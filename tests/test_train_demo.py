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
import torch

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


class FixedRouter(torch.nn.Module):
    """Stands in for a router: its forward returns fixed (logits, scores, chosen experts)."""

    def __init__(self, logits: torch.Tensor, indices: torch.Tensor):
        super().__init__()
        self.out = (logits, None, indices)

    def forward(self, hidden):
        return self.out


def route(routers, hooks):
    for router in routers:
        router(None)
    return hooks.loss().item()


def test_balance_loss_is_per_layer() -> None:
    """The balance loss is 1.0 for a perfectly even router and larger when one layer collapses."""
    mod = load_script()
    even = FixedRouter(torch.zeros(16, 8), torch.arange(8).repeat(4).reshape(-1, 2))
    logits = torch.zeros(16, 8)
    logits[:, 0] = 10.0
    collapsed = FixedRouter(logits, torch.zeros(16, 2, dtype=torch.long))
    assert route([even, even], mod.BalanceHooks([even, even])) == pytest.approx(1.0)
    assert route([even, collapsed], mod.BalanceHooks([even, collapsed])) > 2.0


def test_balance_window_is_the_global_batch() -> None:
    """Two batches that each use a different half of the experts (two "domains") are penalised
    half as much when the loss counts selections over both (window 2) as batch by batch (window 1):
    balance is asked of the window, not of every batch."""
    mod = load_script()
    routers = []
    for first in (0, 2):  # batch 1 picks experts 0 and 1, batch 2 experts 2 and 3 (8 experts, top-2)
        logits = torch.full((16, 8), -30.0)
        logits[:, first:first + 2] = 0.0
        routers.append(FixedRouter(logits, torch.tensor([[first, first + 1]]).repeat(16, 1)))
    losses = {}
    for window in (1, 2):
        hooks = mod.BalanceHooks(routers, window=window)
        losses[window] = [route([r], hooks) for r in routers]
    assert losses[1] == pytest.approx([4.0, 4.0])
    assert losses[2] == pytest.approx([4.0, 2.0])
    assert hooks.load()[1] == 0.0  # four experts of eight never chosen in the window
