"""Beam partitioning: validate -> pseudonymize -> per-user groups -> cap -> virtual clients.

``python -m dpfedemb.partition --input GLOB --output DIR [options] [Beam options]``; the same work is
:func:`run_partition`, used by the CLI and the KFP component. Unknown arguments are Beam pipeline
options (``--runner DataflowRunner --project P --region R --temp_location gs://...``, or
``--direct_running_mode=multi_processing --direct_num_workers=4``).

Steps
  1. Each input file is read whole by one DoFn with TensorFlow's TFRecord reader, so every record
     keeps its source file and index. Broken framing (truncation, CRC error) fails the job with an
     error naming the file; nothing is published. (Beam's own TFRecord reader is not used: its
     errors carry the hex of the broken record, which would put raw user ids into logs.)
  2. :func:`dpfedemb.data.schema.parse_record` validates each record. Invalid ones become dead
     letters (see below) with their reason code, source file and record index.
  3. User ids become pseudonyms: the first 32 hex characters (128 bits) of HMAC-SHA256(key, id).
     The key is a run secret (``--pseudonym-key-file`` or ``$DPFEDEMB_PSEUDONYM_KEY``); neither the
     key nor a raw id is ever written to an output or a log. Valid records are rewritten by
     :func:`schema.make_example` with the pseudonym as ``user_id`` (other features are dropped).
  4. Per user, a combiner keeps the ``max_examples_per_user`` examples with the smallest
     sha256(seed || example) (ties broken by the bytes), so the choice depends on the data and the
     seed, never on arrival order; it holds at most that many examples per user in memory, so a
     user with millions of examples is no hot-key problem. Users left with fewer than
     ``min_examples_per_user`` examples are dropped (all their examples counted as dropped).
  5. Virtual clients of k = ``users_per_client`` users: users are ranked by
     sha256(seed || pseudonym); with n users there are m = floor(n / k + 1/2) clients (at least one
     when n > 0) and the user of rank r joins client ``vc-%06d`` % (r mod m). Every user is in
     exactly one client, the assignment is deterministic for a seed and key, and client sizes are
     floor(n/m) or ceil(n/m), so they differ by at most one. Since |n/m - k| <= k / (2m), every
     size lies in [k-1, k+1] once m >= k/2 (about n >= k*k/2 users); with fewer users no split
     into equal sizes gets closer to k. The rank needs every user's 16-byte order key in one
     place: a sorted list as a side input, about 60 MB of Python objects per worker at 1M users.
     (Past ~1e7 users: bucket the order keys by prefix, count buckets, and rank inside buckets.)

Output (built in a staging sibling, published by :func:`storage.publish_dir` only after the job
succeeded and the counts are conserved; a failed run removes the staging dir and leaves an existing
``DIR`` untouched)::

  DIR/manifest.json        {"format_version": 1, "users_per_client": k, "seed": s, "clients":
                            {client_id: {"file", "users", "examples", "classes", "labels"}}}
  DIR/stats.json           counts (see :func:`build_stats`), conservation-checked, plus the config
  DIR/clients/vc-000000.tfrecord   one file per virtual client: its users' pseudonymized records,
                            users in pseudonym order, each user's examples in cap order
  DIR/dead_letter/*.tfrecord  one tf.train.Example per invalid record: reason, source_file,
                            record_index, record_sha256, record_bytes and ``record``, the record
                            with user ids replaced by pseudonyms and unknown features dropped
                            (``record_withheld`` = 1 and no ``record`` when the bytes are not an
                            Example, since they cannot be scrubbed). The original bytes stay
                            reachable through source_file + record_index + record_sha256 for
                            whoever may read the source; an artifact must not hold raw ids.
  DIR/_COMPLETE

Training opens one client through :func:`client_file` without listing the others. One flat
``clients/`` folder is fine up to ~1e5 files. For a million users (k=1) I would change two things:
spread files over ``clients/<3 hex of sha256(client_id)>/`` (4096 folders, ~250 files each, so
local file systems and listings stay fast), or pack clients into ~1000 shard files with an index of
(client -> shard, byte offset, length) for random access; and split the manifest into a small summary
plus a per-client index file, since a 1e6-entry JSON is ~100 MB to load per training job.
:func:`client_file` is the one place readers resolve a client, so only it would change.

Runner: without ``--runner`` (or with ``--runner DirectRunner``) the pipeline runs on the
FnApiRunner, the engine behind Beam's DirectRunner. Beam 2.77's DirectRunner would first try the
Prism runner, which downloads a binary from GitHub at run time and ignores
``--direct_running_mode``. On Dataflow the workers need this package (the project's container
image), and the key travels inside the pickled DoFn of the job request: keep ``--temp_location``
and the job's project as restricted as the key itself.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import apache_beam as beam
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState
from tensorflow.core.example import example_pb2

from dpfedemb import storage
from dpfedemb.config import ConfigError, PartitionConfig, as_dict
from dpfedemb.data import records, schema

log = logging.getLogger("dpfedemb.partition")

FORMAT_VERSION = 1
KEY_ENV = "DPFEDEMB_PSEUDONYM_KEY"
# Public on purpose: anyone can recompute these pseudonyms, so it is for tests only.
INSECURE_TEST_KEY = b"dpfedemb-INSECURE-TEST-KEY-public-never-use-on-real-data"
MIN_KEY_BYTES = 16
PSEUDONYM_HEX_CHARS = 32
MANIFEST, STATS = "manifest.json", "stats.json"
CLIENTS_DIR, DEAD_LETTER_DIR = "clients", "dead_letter"
_WORK_DIR = "_work"  # driver-read results of the job, removed before publishing
_COUNTS_FILE, _CLIENTS_FILE = "counts.json", "clients.json"
_CLIENT_ID = re.compile(r"vc-\d{6,}")
_DEAD, _COUNTS = "dead", "counts"
_DEAD_PREFIX = "dead_lettered_by_reason/"
# Dead-letter Example features.
DL_REASON, DL_SOURCE, DL_INDEX = "reason", "source_file", "record_index"
DL_SHA256, DL_BYTES, DL_RECORD, DL_WITHHELD = ("record_sha256", "record_bytes", "record",
                                               "record_withheld")


class PartitionError(RuntimeError):
    """The partition job failed or its counts do not add up; nothing was published."""


class _Secret:
    """Holds the pseudonym key; its repr never shows it (Beam display data, tracebacks)."""

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


# ---------------------------------------------------------------- pure rules (shared with bench)

def pseudonymize(key: bytes, user_id: bytes) -> str:
    """The keyed pseudonym of a raw user id: truncated hex HMAC-SHA256."""
    return hmac.new(key, user_id, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_CHARS]


def _seed_bytes(tag: bytes, seed: int) -> bytes:
    return tag + seed.to_bytes(8, "big")


def example_order(seed: int, example: bytes) -> bytes:
    """Sort key of an example for the per-user cap."""
    return hashlib.sha256(_seed_bytes(b"cap", seed) + example).digest()


def user_order(seed: int, pseudonym: str) -> bytes:
    """Sort key of a user for virtual-client assignment."""
    return hashlib.sha256(_seed_bytes(b"vc", seed) + pseudonym.encode("ascii")).digest()[:16]


def cap_examples(examples: Iterable[tuple[int, bytes]], seed: int, cap: int
                 ) -> tuple[int, list[tuple[int, bytes]]]:
    """(total count, the ``cap`` examples with the smallest order keys, in that order)."""
    entries = [(example_order(seed, ex), label, ex) for label, ex in examples]
    kept = heapq.nsmallest(cap, entries)
    return len(entries), [(label, ex) for _, label, ex in kept]


def num_clients(num_users: int, users_per_client: int) -> int:
    """m = floor(n / k + 1/2), at least 1 when there are users."""
    if num_users <= 0:
        return 0
    return max(1, (2 * num_users + users_per_client) // (2 * users_per_client))


def client_id(index: int) -> str:
    return f"vc-{index:06d}"


def client_of_rank(rank: int, num_users: int, users_per_client: int) -> str:
    return client_id(rank % num_clients(num_users, users_per_client))


def assign_clients(pseudonyms: Iterable[str], users_per_client: int, seed: int) -> dict[str, str]:
    """pseudonym -> client id for a whole population (the rule of the module docstring)."""
    ranked = sorted(set(pseudonyms), key=lambda p: user_order(seed, p))
    return {p: client_of_rank(r, len(ranked), users_per_client) for r, p in enumerate(ranked)}


def client_entry(users: int, labels: Iterable[int], examples: int, cid: str) -> dict[str, Any]:
    """One manifest entry."""
    distinct = sorted(set(labels))
    return {"file": f"{CLIENTS_DIR}/{cid}.tfrecord", "users": users, "examples": examples,
            "classes": len(distinct), "labels": distinct}


def validate(record: bytes, cfg: PartitionConfig, key: bytes) -> tuple[str, int, bytes]:
    """(pseudonym, label, pseudonymized record) of a valid record; raises InvalidRecord."""
    r = schema.parse_record(record, max_image_side=cfg.max_image_side,
                            allowed_channels=cfg.allowed_channels,
                            max_user_id_bytes=cfg.max_user_id_bytes)
    p = pseudonymize(key, r.user_id)
    return p, r.label, schema.make_example(r.image, r.label, p.encode("ascii"))


def _scrub_user_id(feature: Any, key: bytes) -> None:
    """Replace every user-id value by its pseudonym, keeping the feature's type."""
    kind = feature.WhichOneof("kind")
    if kind == "bytes_list":
        vals = [pseudonymize(key, v).encode("ascii") if v else v for v in feature.bytes_list.value]
        del feature.bytes_list.value[:]
        feature.bytes_list.value.extend(vals)
    elif kind == "int64_list":
        ints = [int(pseudonymize(key, str(v).encode()), 16) >> 65 for v in feature.int64_list.value]
        del feature.int64_list.value[:]
        feature.int64_list.value.extend(ints)
    elif kind == "float_list":
        floats = [float(int(pseudonymize(key, repr(v).encode())[:12], 16))
                  for v in feature.float_list.value]
        del feature.float_list.value[:]
        feature.float_list.value.extend(floats)


def dead_letter(record: bytes, reason: str, source: str, index: int, key: bytes) -> bytes:
    """A dead-letter Example: where the record came from, why it failed, and a scrubbed copy."""
    out = example_pb2.Example()
    f = out.features.feature
    f[DL_REASON].bytes_list.value.append(reason.encode())
    f[DL_SOURCE].bytes_list.value.append(source.encode())
    f[DL_INDEX].int64_list.value.append(index)
    f[DL_SHA256].bytes_list.value.append(hashlib.sha256(record).hexdigest().encode())
    f[DL_BYTES].int64_list.value.append(len(record))
    try:
        ex = example_pb2.Example.FromString(record)
    except Exception:  # protobuf raises DecodeError and others for garbage
        f[DL_WITHHELD].int64_list.value.append(1)
        return out.SerializeToString()
    for name in list(ex.features.feature):
        # Only schema features survive: an unknown one (an e-mail, a name) could identify someone.
        if name not in (schema.IMAGE, schema.LABEL, schema.USER_ID):
            del ex.features.feature[name]
    if schema.USER_ID in ex.features.feature:
        _scrub_user_id(ex.features.feature[schema.USER_ID], key)
    f[DL_WITHHELD].int64_list.value.append(0)
    f[DL_RECORD].bytes_list.value.append(ex.SerializeToString())
    return out.SerializeToString()


def parse_dead_letter(serialized: bytes) -> dict[str, Any]:
    """A dead-letter record as a dict (``record`` is None when withheld)."""
    f = example_pb2.Example.FromString(serialized).features.feature
    rec = f[DL_RECORD].bytes_list.value if DL_RECORD in f else []
    return {"reason": f[DL_REASON].bytes_list.value[0].decode(),
            "source_file": f[DL_SOURCE].bytes_list.value[0].decode(),
            "record_index": int(f[DL_INDEX].int64_list.value[0]),
            "record_sha256": f[DL_SHA256].bytes_list.value[0].decode(),
            "record_bytes": int(f[DL_BYTES].int64_list.value[0]),
            "record": rec[0] if rec else None}


# ---------------------------------------------------------------- Beam transforms (all picklable)

def read_tfrecord_file(path: str) -> Iterator[bytes]:
    """Records of one file; a CRC error or a truncation anywhere raises StorageError naming it
    (:func:`dpfedemb.data.records.read_file_records`: one read, framing and CRCs checked)."""
    return records.read_file_records(path)


class _ReadFile(beam.DoFn):
    """A whole TFRecord file -> (source, index, record); a corrupt file raises naming the file."""

    def process(self, path: str) -> Iterator[Any]:
        n = 0
        for n, rec in enumerate(read_tfrecord_file(path), start=1):
            yield path, n - 1, rec
        yield beam.pvalue.TaggedOutput(_COUNTS, ("records_in", n))


class _Validate(beam.DoFn):
    """Valid records -> (pseudonym, (label, record)); invalid ones -> (reason, dead letter)."""

    def __init__(self, cfg: PartitionConfig, key: _Secret) -> None:
        self._cfg, self._key = cfg, key

    def process(self, item: tuple[str, int, bytes]) -> Iterator[Any]:
        source, index, record = item
        try:
            p, label, example = validate(record, self._cfg, self._key.value)
        except schema.InvalidRecord as e:
            yield beam.pvalue.TaggedOutput(
                _DEAD, (e.reason, dead_letter(record, e.reason, source, index, self._key.value)))
            return
        yield p, (label, example)


class _CapCombine(beam.CombineFn):
    """Per user: [count, up to ``cap`` (order, label, record) with the smallest order keys]."""

    def __init__(self, seed: int, cap: int) -> None:
        self._seed, self._cap = seed, cap

    def create_accumulator(self) -> list[Any]:
        return [0, []]

    def _trim(self, kept: list[Any]) -> list[Any]:
        return heapq.nsmallest(self._cap, kept)

    def add_input(self, acc: list[Any], item: tuple[int, bytes]) -> list[Any]:
        label, example = item
        acc[0] += 1
        acc[1].append((example_order(self._seed, example), label, example))
        if len(acc[1]) >= 2 * self._cap:  # trim in batches: amortized O(log cap) per input
            acc[1] = self._trim(acc[1])
        return acc

    def merge_accumulators(self, accs: Iterable[list[Any]]) -> list[Any]:
        accs = list(accs)
        return [sum(a[0] for a in accs), self._trim([e for a in accs for e in a[1]])]

    def extract_output(self, acc: list[Any]) -> tuple[int, list[tuple[int, bytes]]]:
        return acc[0], [(label, ex) for _, label, ex in self._trim(acc[1])]


class _ApplyMinimum(beam.DoFn):
    """Drops users under the minimum; counts kept, over-cap and dropped examples."""

    def __init__(self, min_examples: int) -> None:
        self._min = min_examples

    def process(self, kv: tuple[str, tuple[int, list[tuple[int, bytes]]]]) -> Iterator[Any]:
        p, (total, kept) = kv
        if total < self._min:
            yield beam.pvalue.TaggedOutput(_COUNTS, ("users_dropped", 1))
            yield beam.pvalue.TaggedOutput(_COUNTS, ("examples_of_dropped_users", total))
            return
        yield beam.pvalue.TaggedOutput(_COUNTS, ("users", 1))
        yield beam.pvalue.TaggedOutput(_COUNTS, ("examples_kept", len(kept)))
        yield beam.pvalue.TaggedOutput(_COUNTS, ("examples_over_cap", total - len(kept)))
        yield p, kept


def _user_order_of(kv: tuple[str, Any], seed: int) -> bytes:
    return user_order(seed, kv[0])


class _AssignClient(beam.DoFn):
    """(pseudonym, examples) -> (client id, (pseudonym, examples)) by rank in the sorted keys."""

    def __init__(self, users_per_client: int, seed: int) -> None:
        self._k, self._seed = users_per_client, seed

    def process(self, kv: tuple[str, Any], order: list[bytes]) -> Iterator[Any]:
        rank = bisect.bisect_left(order, user_order(self._seed, kv[0]))
        yield client_of_rank(rank, len(order), self._k), kv


class _WriteClient(beam.DoFn):
    """Writes one virtual client's records to ``<dir>/<client id>.tfrecord``; yields its entry."""

    def __init__(self, clients_dir: str) -> None:
        self._dir = clients_dir

    def setup(self) -> None:
        storage.makedirs(self._dir)

    def process(self, kv: tuple[str, Iterable[tuple[str, list[tuple[int, bytes]]]]]
                ) -> Iterator[tuple[str, dict[str, Any]]]:
        cid, users = kv
        users = sorted(users, key=lambda u: u[0])
        path = storage.join(self._dir, f"{cid}.tfrecord")
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # a retried bundle never leaves a half file
        labels: list[int] = []
        with tf.io.TFRecordWriter(tmp) as w:
            for _, kept in users:
                for label, example in kept:
                    w.write(example)
                    labels.append(label)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        yield cid, client_entry(len(users), labels, len(labels), cid)


def _named(value: Any, name: str) -> tuple[str, Any]:
    return name, value


def _reason_count(item: tuple[str, bytes]) -> tuple[str, int]:
    return _DEAD_PREFIX + item[0], 1


def _write_json(obj: Any, path: str) -> None:
    storage.write_json_atomic(path, obj)


def _sorted(xs: list[bytes]) -> list[bytes]:
    return sorted(xs)


def build_pipeline(p: beam.Pipeline, files: Sequence[str], stage: str, cfg: PartitionConfig,
                   key: bytes) -> None:
    """Add the partition transforms to ``p``: outputs go under ``stage``."""
    secret = _Secret(key)
    read = (p | "Files" >> beam.Create(list(files))
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFile()).with_outputs(_COUNTS, main="records"))
    checked = (read.records
               | "Validate" >> beam.ParDo(_Validate(cfg, secret)).with_outputs(_DEAD, main="valid"))
    dead = checked[_DEAD]
    (dead | "DeadRecords" >> beam.Values()
     | "WriteDead" >> beam.io.WriteToTFRecord(storage.join(stage, DEAD_LETTER_DIR, "dead_letter"),
                                              file_name_suffix=".tfrecord"))
    users = (checked.valid
             | "Cap" >> beam.CombinePerKey(_CapCombine(cfg.seed, cfg.max_examples_per_user))
             | "Minimum" >> beam.ParDo(_ApplyMinimum(cfg.min_examples_per_user))
             .with_outputs(_COUNTS, main="users"))
    order = (users.users
             | "UserOrder" >> beam.Map(_user_order_of, cfg.seed)
             | "AllOrders" >> beam.combiners.ToList()
             | "SortOrders" >> beam.Map(_sorted))
    entries = (users.users
               | "Assign" >> beam.ParDo(_AssignClient(cfg.users_per_client, cfg.seed),
                                        beam.pvalue.AsSingleton(order))
               | "ByClient" >> beam.GroupByKey()
               | "WriteClients" >> beam.ParDo(_WriteClient(storage.join(stage, CLIENTS_DIR))))
    work = storage.join(stage, _WORK_DIR)
    (entries | "AllEntries" >> beam.combiners.ToList()
     | "SaveEntries" >> beam.Map(_write_json, storage.join(work, _CLIENTS_FILE)))
    valid_count = (checked.valid | "CountValid" >> beam.combiners.Count.Globally()
                   | "NameValid" >> beam.Map(_named, "valid"))
    reasons = dead | "ReasonOnes" >> beam.Map(_reason_count)
    ((read[_COUNTS], users[_COUNTS], valid_count, reasons)
     | "AllCounts" >> beam.Flatten()
     | "SumCounts" >> beam.CombinePerKey(sum)
     | "CountList" >> beam.combiners.ToList()
     | "SaveCounts" >> beam.Map(_write_json, storage.join(work, _COUNTS_FILE)))


# ---------------------------------------------------------------- driver

def pipeline_options(beam_args: Optional[Sequence[str]]) -> PipelineOptions:
    """Beam options from extra arguments; the local default is the FnApiRunner (see docstring)."""
    opts = PipelineOptions(list(beam_args or []))
    std = opts.view_as(StandardOptions)
    if std.runner is None or str(std.runner).lower() in ("direct", "directrunner"):
        std.runner = "FnApiRunner"
    return opts


def build_stats(counts: Mapping[str, int], clients: Mapping[str, Mapping[str, Any]],
                cfg: PartitionConfig, input_glob: str, num_files: int) -> dict[str, Any]:
    """stats.json from the job's counters and manifest entries; raises if counts are not conserved."""
    by_reason = {r: int(counts.get(_DEAD_PREFIX + r, 0)) for r in schema.REASONS}
    unknown = sorted(k for k in counts if k.startswith(_DEAD_PREFIX)
                     and k[len(_DEAD_PREFIX):] not in by_reason)
    for k in unknown:
        by_reason[k[len(_DEAD_PREFIX):]] = int(counts[k])

    def get(name: str) -> int:
        return int(counts.get(name, 0))

    labels = {label for c in clients.values() for label in c["labels"]}
    sizes = [c["users"] for c in clients.values()]
    stats = {"records_in": get("records_in"), "valid": get("valid"),
             "dead_lettered": sum(by_reason.values()), "dead_lettered_by_reason": by_reason,
             "examples_kept": get("examples_kept"), "examples_over_cap": get("examples_over_cap"),
             "examples_of_dropped_users": get("examples_of_dropped_users"),
             "users": get("users"), "users_dropped": get("users_dropped"),
             "virtual_clients": len(clients), "classes": len(labels),
             "users_per_client_min": min(sizes, default=0),
             "users_per_client_max": max(sizes, default=0),
             "input": {"glob": input_glob, "files": num_files},
             "config": as_dict(cfg), "format_version": FORMAT_VERSION}
    check_conservation(stats, clients, cfg)
    return stats


def check_conservation(stats: Mapping[str, Any], clients: Mapping[str, Mapping[str, Any]],
                       cfg: PartitionConfig) -> None:
    """Every input record is accounted for exactly once; raise PartitionError otherwise."""
    s = stats
    checks = [
        ("records_in == examples_kept + examples_over_cap + examples_of_dropped_users + "
         "dead_lettered", s["records_in"], s["examples_kept"] + s["examples_over_cap"]
         + s["examples_of_dropped_users"] + s["dead_lettered"]),
        ("records_in == valid + dead_lettered", s["records_in"], s["valid"] + s["dead_lettered"]),
        ("sum of client examples == examples_kept",
         sum(c["examples"] for c in clients.values()), s["examples_kept"]),
        ("sum of client users == users", sum(c["users"] for c in clients.values()), s["users"]),
        ("virtual_clients == floor(users / users_per_client + 1/2)", len(clients),
         num_clients(s["users"], cfg.users_per_client)),
    ]
    bad = [f"{name}: {a} != {b}" for name, a, b in checks if a != b]
    if bad:
        raise PartitionError("partition counts are not conserved (nothing published): "
                             + "; ".join(bad))


def _job_error(e: BaseException) -> str:
    """The useful line of a Beam failure (the worker's own error, not the wrapping traceback)."""
    text = str(e)
    for pat in (r"StorageError: (.+)", r"(\S+ is not valid TFRecord data[^\n]*)"):
        m = re.search(pat, text)
        if m:
            return m.group(1).strip()
    return f"{type(e).__name__}: {text.strip().splitlines()[-1] if text.strip() else ''}"


def _run_job(files: Sequence[str], stage: str, cfg: PartitionConfig, key: bytes,
             beam_args: Optional[Sequence[str]]) -> None:
    opts = pipeline_options(beam_args)
    p = beam.Pipeline(options=opts)
    build_pipeline(p, files, stage, cfg, key)
    try:
        state = p.run().wait_until_finish()
    except Exception as e:  # runners wrap worker errors in many types
        raise PartitionError(f"partition job failed, nothing published: {_job_error(e)}") from e
    if state not in (None, PipelineState.DONE):
        raise PartitionError(f"partition job ended in state {state}, nothing published")


def _finish(stage: str, cfg: PartitionConfig, input_glob: str, num_files: int
            ) -> dict[str, Any]:
    """Read the job's results back, check them, and write manifest.json and stats.json."""
    work = storage.join(stage, _WORK_DIR)
    counts = dict(storage.read_json(storage.join(work, _COUNTS_FILE)))
    clients = dict(storage.read_json(storage.join(work, _CLIENTS_FILE)))
    stats = build_stats(counts, clients, cfg, input_glob, num_files)
    manifest = {"format_version": FORMAT_VERSION, "users_per_client": cfg.users_per_client,
                "seed": cfg.seed, "clients": clients}
    storage.write_json_atomic(storage.join(stage, MANIFEST), manifest)
    storage.write_json_atomic(storage.join(stage, STATS), stats)
    storage.makedirs(storage.join(stage, DEAD_LETTER_DIR))
    storage.makedirs(storage.join(stage, CLIENTS_DIR))
    storage.remove_tree(work)
    return stats


def run_partition(input_glob: str, output_dir: str, cfg: PartitionConfig, key: bytes,
                  beam_args: list[str] | None = None) -> dict[str, Any]:
    """Partition the records matching ``input_glob`` into ``output_dir``; return stats.json."""
    check_key(key)
    files = records.files_of(input_glob)
    stage = storage.staging_dir(output_dir)
    log.info("partition: %d input file(s) -> %s (k=%d, cap=%d, min=%d, seed=%d)", len(files),
             output_dir, cfg.users_per_client, cfg.max_examples_per_user,
             cfg.min_examples_per_user, cfg.seed)
    t0 = time.time()
    try:
        storage.makedirs(stage)
        _run_job(files, stage, cfg, key, beam_args)
        log.info("partition: job finished in %.1f s; checking counts", time.time() - t0)
        stats = _finish(stage, cfg, input_glob, len(files))
        storage.publish_dir(stage, output_dir)
    except BaseException:
        try:
            storage.remove_tree(stage)
        except storage.StorageError as e:
            log.error("partition: could not remove staging dir: %s", e)
        raise
    log.info("partition: published %s: %d records in, %d kept, %d dead-lettered, %d users, "
             "%d virtual clients", output_dir, stats["records_in"], stats["examples_kept"],
             stats["dead_lettered"], stats["users"], stats["virtual_clients"])
    if stats["virtual_clients"] == 0:
        log.warning("partition: no user passed validation and the minimum; see %s",
                    storage.join(output_dir, DEAD_LETTER_DIR))
    return stats


# ---------------------------------------------------------------- readers

def load_manifest(partition_dir: str) -> dict[str, Any]:
    """The manifest of a complete partition directory."""
    storage.require_complete(partition_dir, "partition")
    manifest = storage.read_json(storage.join(partition_dir, MANIFEST))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise storage.StorageError(
            f"{partition_dir}/{MANIFEST} has format_version {manifest.get('format_version')!r}; "
            f"this code reads {FORMAT_VERSION}: rerun the partition step")
    return manifest


def client_file(partition_dir: str, client: str) -> str:
    """Path of one virtual client's TFRecord file."""
    if not _CLIENT_ID.fullmatch(client):
        raise ValueError(f"invalid client id {client!r}: expected vc-NNNNNN")
    return storage.join(partition_dir, CLIENTS_DIR, f"{client}.tfrecord")


def read_dead_letters(partition_dir: str) -> list[dict[str, Any]]:
    """All dead letters of a partition directory, as :func:`parse_dead_letter` dicts."""
    files = storage.glob(storage.join(partition_dir, DEAD_LETTER_DIR, "*.tfrecord"))
    return [parse_dead_letter(r) for r in records.iter_records(files)]


# ---------------------------------------------------------------- key and CLI

def check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"invalid pseudonym key: must be at least {MIN_KEY_BYTES} bytes "
                          "(e.g. 32 random bytes: head -c 32 /dev/urandom | base64)")


def resolve_key(key_file: Optional[str], insecure_test_key: bool,
                environ: Mapping[str, str]) -> bytes:
    """The pseudonym key from a file, then the environment; the public test key only on request."""
    if insecure_test_key:
        msg = ("WARNING: --insecure-test-key uses a PUBLIC key: anyone can reverse these "
               "pseudonyms by trying user ids. For tests only, never on real data.")
        log.warning(msg)
        print(msg, file=sys.stderr)
        return INSECURE_TEST_KEY
    if key_file:
        key = storage.read_bytes(key_file).strip()
    elif environ.get(KEY_ENV):
        key = environ[KEY_ENV].encode("utf-8")
    else:
        raise ConfigError(f"no pseudonym key: pass --pseudonym-key-file FILE or set {KEY_ENV} "
                          "(--insecure-test-key exists for tests only)")
    check_key(key)
    return key


def build_parser() -> argparse.ArgumentParser:
    d = PartitionConfig()
    p = argparse.ArgumentParser(
        prog="python -m dpfedemb.partition", allow_abbrev=False,
        description="Validate, pseudonymize and group records into virtual clients (Apache "
                    "Beam). Unknown --options are passed to Beam (e.g. --runner DataflowRunner).")
    p.add_argument("--input", required=True, help="TFRecord glob (local or gs://)")
    p.add_argument("--output", required=True, help="partition directory (local or gs://)")
    p.add_argument("--users-per-client", type=int, default=d.users_per_client)
    p.add_argument("--max-examples-per-user", type=int, default=d.max_examples_per_user)
    p.add_argument("--min-examples-per-user", type=int, default=d.min_examples_per_user)
    p.add_argument("--seed", type=int, default=d.seed)
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--pseudonym-key-file", default=None,
                      help=f"file holding the HMAC key (else ${KEY_ENV})")
    keys.add_argument("--insecure-test-key", action="store_true",
                      help="use a public, documented key: tests only")
    return p


def _typo_args(beam_args: Sequence[str]) -> list[str]:
    """Extra options with dashes inside the name: Beam's use underscores, so these are typos."""
    return [a for a in beam_args if a.startswith("--") and "-" in a[2:].split("=", 1)[0]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    typos = _typo_args(beam_args)
    if typos:
        print(f"error: unknown argument(s) {typos} (Beam options use underscores; see --help)",
              file=sys.stderr)
        return 2
    try:
        cfg = PartitionConfig(users_per_client=args.users_per_client,
                              max_examples_per_user=args.max_examples_per_user,
                              min_examples_per_user=args.min_examples_per_user, seed=args.seed)
        key = resolve_key(args.pseudonym_key_file, args.insecure_test_key, os.environ)
    except (ConfigError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        stats = run_partition(args.input, args.output, cfg, key, beam_args)
    except (PartitionError, storage.StorageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"output": args.output, **{k: stats[k] for k in (
        "records_in", "examples_kept", "dead_lettered", "users", "virtual_clients")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
