"""Retrieval metrics over embeddings (cosine similarity)."""
from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def recall_at_1(embeddings: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> tuple[float, int]:
    """Fraction of queries whose nearest other item (cosine) has the same label.

    Queries whose class has a single item cannot be answered and are excluded; returns
    (recall, number of queries used). Ties in similarity go to the lowest index.
    """
    labels = np.asarray(labels)
    e = l2_normalize(embeddings)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    usable = counts[inverse] > 1
    hits = 0
    for start in range(0, len(e), chunk):
        idx = np.arange(start, min(start + chunk, len(e)))
        idx = idx[usable[idx]]
        if not len(idx):
            continue
        sims = e[idx] @ e.T
        sims[np.arange(len(idx)), idx] = -np.inf
        hits += int((labels[np.argmax(sims, axis=1)] == labels[idx]).sum())
    used = int(usable.sum())
    return (hits / used if used else float("nan")), used
