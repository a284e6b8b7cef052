"""Virtual clients for training: their data (one file each) and how they are sampled per round.

Sampling randomness must stay secret: if an observer knew which clients took part in a round, the
privacy amplification by sampling that the accountant assumes would not hold. The sampler is
seeded from the operating system unless a seed is given (tests); its state goes into checkpoints,
which are therefore secrets like the pseudonym key.
"""
from __future__ import annotations

import secrets
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from dpfedemb import partition
from dpfedemb.config import ImageSpec
from dpfedemb.data import records


class ClientStore:
    """Decoded virtual-client data, read one file per client on first use and kept in memory."""

    def __init__(self, partition_dir: str, spec: ImageSpec, local_labels: bool) -> None:
        self.partition_dir = partition_dir
        self.manifest = partition.load_manifest(partition_dir)
        self.ids = sorted(self.manifest["clients"])
        if not self.ids:
            raise ValueError(f"partition {partition_dir} has no virtual clients")
        self.spec = spec
        self.local_labels = local_labels
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def max_local_classes(self) -> int:
        return max(int(c["classes"]) for c in self.manifest["clients"].values())

    @property
    def num_global_classes(self) -> int:
        return 1 + max(max(c["labels"]) for c in self.manifest["clients"].values())

    @property
    def users_per_client(self) -> int:
        return int(self.manifest["users_per_client"])

    @property
    def num_users(self) -> int:
        return sum(int(c["users"]) for c in self.manifest["clients"].values())

    def arrays(self, cid: str) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 NHWC, labels int32) of one client; labels local (0..n-1) for DP-FedEmb."""
        if cid not in self._cache:
            x, y, _ = records.load_arrays([partition.client_file(self.partition_dir, cid)], self.spec)
            if self.local_labels:
                y = np.unique(y, return_inverse=True)[1]
            self._cache[cid] = (x, y.astype(np.int32))
        return self._cache[cid]

    def dataset(self, cid: str, rng: np.random.Generator, max_examples: int,
                batch_size: int) -> tf.data.Dataset:
        """One round's data of a client: at most ``max_examples``, in a random order."""
        x, y = self.arrays(cid)
        order = rng.permutation(len(y))[:max_examples]
        return tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(batch_size)


class Sampler:
    """Per-round client sampling: Poisson (rate q), fixed-size, or one epoch without repeats."""

    def __init__(self, ids: list[str], mode: str, clients_per_round: int,
                 seed: Optional[int] = None) -> None:
        self.ids, self.mode, self.per_round = ids, mode, clients_per_round
        self.rng = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
        self._epoch_order: Optional[list[int]] = None
        self._epoch_pos = 0

    def sample(self) -> list[str]:
        n = len(self.ids)
        if self.mode == "poisson":
            chosen = np.flatnonzero(self.rng.random(n) < self.per_round / n)
        elif self.mode == "fixed":
            chosen = np.sort(self.rng.choice(n, self.per_round, replace=False))
        else:  # "epoch": tree aggregation, each client at most once
            if self._epoch_order is None:
                self._epoch_order = [int(i) for i in self.rng.permutation(n)]
            chosen = self._epoch_order[self._epoch_pos:self._epoch_pos + self.per_round]
            self._epoch_pos += self.per_round
        return [self.ids[i] for i in chosen]

    def get_state(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state, "epoch_order": self._epoch_order,
                "epoch_pos": self._epoch_pos}

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self._epoch_order = state["epoch_order"]
        self._epoch_pos = state["epoch_pos"]
