"""Partition throughput: the Beam pipeline vs a plain single-process Python loop on the same input.

``python -m bench.partition [--records 100000] [Beam options]`` generates 28x28 PNG records
(about 20 per user, one in a thousand broken), runs :func:`dpfedemb.partition.run_partition`
(DirectRunner engine unless Beam options say otherwise) and :func:`plain_partition`, which applies
the same rules with the same helper functions in one process, checks that both produce the same
manifest, and writes records/s of both to ``bench/results/partition.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dpfedemb import partition, storage  # noqa: E402
from dpfedemb.config import PartitionConfig, as_dict  # noqa: E402
from dpfedemb.data import records, schema  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "partition.json")


def generate(directory: str, n: int, shards: int, seed: int = 0) -> list[str]:
    """``n`` records of noisy 28x28 grey PNGs, ~20 per user, every 1000th one broken."""
    rng = np.random.default_rng(seed)
    users = max(1, n // 20)
    base = rng.integers(0, 255, (10, 28, 28)).astype(np.int16)

    def make(i: int) -> bytes:
        label = int(rng.integers(0, 10))
        noise = rng.integers(-30, 30, (28, 28))
        img = schema.encode_image(np.clip(base[label] + noise, 0, 255).astype(np.uint8))
        if i % 1000 == 999:
            img = img[: len(img) // 2]
        return schema.make_example(img, label, b"bench-user-%07d" % rng.integers(0, users))

    return records.write_shards((make(i) for i in range(n)), directory, "bench", shards)


def plain_partition(files: Sequence[str], output_dir: str, cfg: PartitionConfig, key: bytes
                    ) -> dict[str, Any]:
    """The partition rules in one Python process (no Beam, no staging); returns the manifest."""
    by_user: dict[str, list[tuple[int, bytes]]] = collections.defaultdict(list)
    dead = []
    for path in files:
        for index, rec in enumerate(partition.read_tfrecord_file(path)):
            try:
                p, label, example = partition.validate(rec, cfg, key)
            except schema.InvalidRecord as e:
                dead.append(partition.dead_letter(rec, e.reason, path, index, key))
                continue
            by_user[p].append((label, example))
    kept_users = {}
    for p, examples in by_user.items():
        total, kept = partition.cap_examples(examples, cfg.seed, cfg.max_examples_per_user)
        if total >= cfg.min_examples_per_user:
            kept_users[p] = kept
    assignment = partition.assign_clients(kept_users, cfg.users_per_client, cfg.seed)
    members: dict[str, list[str]] = collections.defaultdict(list)
    for p, cid in assignment.items():
        members[cid].append(p)
    storage.makedirs(storage.join(output_dir, partition.CLIENTS_DIR))
    clients = {}
    for cid, users in members.items():
        labels = []
        with tf.io.TFRecordWriter(partition.client_file(output_dir, cid)) as w:
            for p in sorted(users):
                for label, example in kept_users[p]:
                    w.write(example)
                    labels.append(label)
        clients[cid] = partition.client_entry(len(users), labels, len(labels), cid)
    records.write_shards(dead, storage.join(output_dir, partition.DEAD_LETTER_DIR), "dead", 1)
    return {"format_version": partition.FORMAT_VERSION, "users_per_client": cfg.users_per_client,
            "seed": cfg.seed, "clients": clients}


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.partition", allow_abbrev=False)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--users-per-client", type=int, default=1)
    p.add_argument("--max-examples-per-user", type=int, default=64)
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed after")
    p.add_argument("--results", default=RESULTS)
    args, beam_args = p.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = PartitionConfig(users_per_client=args.users_per_client,
                          max_examples_per_user=args.max_examples_per_user)
    key = partition.INSECURE_TEST_KEY  # synthetic users only
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        t_gen, files = _timed(generate, os.path.join(work, "in"), args.records, args.shards)
        print(f"generated {args.records} records in {t_gen:.1f} s", flush=True)
        t_beam, stats = _timed(partition.run_partition, os.path.join(work, "in", "*.tfrecord"),
                               os.path.join(work, "beam"), cfg, key, beam_args)
        print(f"beam:  {t_beam:.1f} s", flush=True)
        t_plain, manifest = _timed(plain_partition, files, os.path.join(work, "plain"), cfg, key)
        print(f"plain: {t_plain:.1f} s", flush=True)
        same = manifest == partition.load_manifest(os.path.join(work, "beam"))
    result = {
        "records": args.records, "shards": args.shards, "config": as_dict(cfg),
        "beam_args": beam_args or ["(default: FnApiRunner, in_memory)"],
        "beam_seconds": round(t_beam, 2), "plain_seconds": round(t_plain, 2),
        "beam_records_per_s": round(args.records / t_beam, 1),
        "plain_records_per_s": round(args.records / t_plain, 1),
        "beam_over_plain_speed": round(t_plain / t_beam, 3),
        "same_manifest": same, "users": stats["users"], "virtual_clients": stats["virtual_clients"],
        "dead_lettered": stats["dead_lettered"],
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "python": platform.python_version()},
    }
    storage.write_json_atomic(args.results, result)
    print(json.dumps({k: result[k] for k in ("records", "beam_records_per_s", "plain_records_per_s",
                                             "beam_over_plain_speed", "same_manifest")}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
