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
