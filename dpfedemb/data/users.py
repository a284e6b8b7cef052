"""Simulated users for data sets that have no owners: a seeded, non-IID split.

Each user draws a class distribution from Dirichlet(alpha) and a size around the configured mean
(log-normal spread, at least one image); images are then dealt to users by class. Every image goes
to exactly one user. Small alpha gives users few classes each (strong skew), large alpha near-IID.
"""
from __future__ import annotations

import numpy as np

from dpfedemb.config import SimulationConfig


def _sizes(n: int, users: int, rng: np.random.Generator) -> np.ndarray:
    """User sizes >= 1 summing to exactly ``n``, spread log-normally around n / users."""
    weights = rng.lognormal(mean=0.0, sigma=0.5, size=users)
    extra = rng.multinomial(n - users, weights / weights.sum())
    return extra + 1


def simulate_users(labels: np.ndarray, cfg: SimulationConfig) -> np.ndarray:
    """Return ``user[i]`` in [0, U) for each image i; U = ceil(len(labels) / mean size)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        return np.zeros((0,), np.int64)
    rng = np.random.default_rng(cfg.seed)
    num_users = max(1, int(np.ceil(n / cfg.mean_examples_per_user)))
    sizes = _sizes(n, num_users, rng)
    classes, inverse = np.unique(labels, return_inverse=True)
    pools = [list(rng.permutation(np.flatnonzero(inverse == c))) for c in range(len(classes))]
    remaining = np.array([len(p) for p in pools], dtype=np.float64)
    prior = remaining / remaining.sum()
    owner = np.full(n, -1, np.int64)
    for u in rng.permutation(num_users):
        p = rng.dirichlet(np.full(len(classes), cfg.dirichlet_alpha)) * 0.999 + prior * 0.001
        need = int(sizes[u])
        while need > 0:
            avail = remaining > 0
            q = np.where(avail, p, 0.0)
            q = q / q.sum() if q.sum() > 0 else avail / avail.sum()
            counts = np.minimum(rng.multinomial(need, q), remaining.astype(np.int64))
            for c in np.flatnonzero(counts):
                k = int(counts[c])
                take, pools[c] = pools[c][:k], pools[c][k:]
                owner[take] = u
                remaining[c] -= k
                need -= k
    assert (owner >= 0).all(), "every image must have exactly one user"
    return owner


def user_ids(owner: np.ndarray, prefix: str) -> list[bytes]:
    """Readable raw ids for simulated users (they are pseudonymized by the partition step)."""
    return [f"{prefix}-{int(u):07d}".encode() for u in owner]
