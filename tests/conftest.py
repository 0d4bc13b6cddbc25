"""Shared fixtures: tiny random models are cached per model type (they are rebuilt identically)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

torch.set_num_threads(1)  # tests use tiny models; extra threads only spin against each other on 2 shared cores
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")


@functools.cache
def cached_tiny_model(model_type: str):
    from moescope.models.tiny import tiny_model

    return tiny_model(model_type)


@pytest.fixture
def tiny():
    return cached_tiny_model


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """Real inputs for the hostile-input tests, made once: a tiny Qwen3-MoE checkpoint in 12 shards with
    a tokenizer, a calibration set, a profile of the model, and a prune plan and a bit plan from it.
    Tests must leave them as they are (they hash them to prove it)."""
    from types import SimpleNamespace

    from helpers import tokenizer, write_calibration

    from moescope.cli import main
    from moescope.models.tiny import tiny_model

    root = tmp_path_factory.mktemp("inputs")
    model = root / "model"
    tiny_model("qwen3_moe").save_pretrained(model, max_shard_size="40KB")
    tokenizer().save_pretrained(model)
    write_calibration(root / "cal.jsonl", 9)
    found = SimpleNamespace(root=root, model=model, calibration=root / "cal.jsonl", profile=root / "profile",
                            prune_plan=root / "prune.json", bit_plan=root / "bits.json")
    for argv in (["profile", model, "--calibration", found.calibration, "--out", found.profile, "--batch-size", "3"],
                 ["plan", "prune", found.profile, "--ratio", "0.25", "--out", found.prune_plan],
                 ["plan", "tiers", found.profile, "--out", found.bit_plan]):
        assert main([str(a) for a in argv]) == 0
    return found
