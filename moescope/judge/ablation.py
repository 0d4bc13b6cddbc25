"""Measured importance: the loss increase on calibration text when one expert alone is masked.

The ablation criterion of `moescope plan prune` and `sweep prune`: no proxy, the real effect of each
expert's removal (as a -inf logit, which for softmax-then-top-k routers equals removal), batched so
that one forward pass masks a different expert in each copy of the windows.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from moescope.backends.hf.loading import Placement, load_model, load_tokenizer, model_identity
from moescope.calibration import calibration_windows
from moescope.compress.prune import routing_offsets
from moescope.judge.nll import window_nll
from moescope.models.registry import find_moe_layers


@torch.no_grad()
def ablation_scores(model, windows: torch.Tensor, max_rows: int = 64, progress: bool = True) -> dict[int, list[float]]:
    """Loss increase on `windows` when each expert alone is masked, per MoE layer.

    Batched: one forward pass masks a different expert in each copy of the windows, so a layer of
    E experts costs E x len(windows) window evaluations in E * len(windows) / max_rows passes.
    """
    def window_losses(rows: torch.Tensor) -> torch.Tensor:
        return window_nll(model, rows, batch_size=len(rows)) / (rows.shape[1] - 1)

    layers = find_moe_layers(model)
    base = window_losses(windows).mean().item()
    per_pass = max(1, max_rows // len(windows))
    scores: dict[int, list[float]] = {}
    total = sum((layer.num_experts + per_pass - 1) // per_pass for layer in layers)
    with tqdm(total=total, desc="ablation", unit="pass", disable=not progress) as bar:
        for layer in layers:
            scores[layer.index] = []
            for start in range(0, layer.num_experts, per_pass):
                experts = list(range(start, min(start + per_pass, layer.num_experts)))
                offsets = torch.zeros(len(experts) * len(windows), layer.num_experts)
                for i, expert in enumerate(experts):
                    offsets[i * len(windows):(i + 1) * len(windows), expert] = float("-inf")
                with routing_offsets(model, {layer.index: offsets}):
                    losses = window_losses(windows.repeat(len(experts), 1))
                scores[layer.index] += (losses.view(len(experts), -1).mean(-1) - base).tolist()
                bar.update()
    return scores


def measured_ablation(profile, model_dir: str, calibration: str, windows: int, length: int,
                      placement: Placement | None = None) -> np.ndarray:
    """Ablation scores [L, E] for the profile's layers, measured on calibration text."""
    model, tokenizer = load_model(model_dir, placement), load_tokenizer(model_dir)
    profile.model.require(model_identity(model), "profile")
    batch = calibration_windows(calibration, tokenizer, windows, length)
    measured = ablation_scores(model, batch)
    scores = np.zeros(profile.counters["selections"].shape[2:])
    for row, layer in enumerate(profile.layers):
        scores[row, : layer["num_experts"]] = measured[layer["layer"]]
    return scores
