"""Shared fixtures: tiny generated data, and quiet TensorFlow."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_images() -> tuple[np.ndarray, np.ndarray]:
    """120 28x28 grey images in 6 classes with class-dependent structure (learnable)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 20)
    x = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.float32)
    for i, c in enumerate(labels):
        x[i, 4 * c:4 * c + 6, :] += 150
    return np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int64)
