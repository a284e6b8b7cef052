"""Beam partitioning: dead letters, pseudonyms, cap/minimum, virtual clients, publishing."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.example import example_pb2

from dpfedemb import partition, storage
from dpfedemb.config import ConfigError, PartitionConfig
from dpfedemb.data import records, schema

KEY = partition.INSECURE_TEST_KEY
RAW = b"RAWUSER-"  # every raw id starts with this, so one grep finds any leak
CFG = PartitionConfig(users_per_client=2, max_examples_per_user=4, min_examples_per_user=2,
                      max_image_side=64, allowed_channels=(1, 3), max_user_id_bytes=64, seed=7)
# Examples per raw user: 0 and 1 fall under the minimum, 5, 6 and 8 over the cap.
USER_SIZES = [1, 1, 2, 3, 4, 6, 7, 2, 5]
NUM_FILES = 3


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _example(image: Any = None, label: Any = None, user: Any = None, label_kind: str = "int",
             user_kind: str = "bytes") -> bytes:
    """An Example with each feature optional and typed as asked (to build bad records)."""
    ex = example_pb2.Example()
    f = ex.features.feature
    if image is not None:
        f[schema.IMAGE].bytes_list.value.append(image)
    for name, value, kind in ((schema.LABEL, label, label_kind), (schema.USER_ID, user, user_kind)):
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        getattr(f[name], {"int": "int64_list", "float": "float_list",
                          "bytes": "bytes_list"}[kind]).value.extend(values)
    return ex.SerializeToString()


def _bad_records(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(expected reason, record): every reason code, some through several kinds of damage."""
    img = schema.encode_image(rng.integers(0, 255, (28, 28), dtype=np.uint8))
    uid = RAW + b"bad"
    return [
        (schema.NOT_AN_EXAMPLE, b"\x0a\xff\xff\xff\xff\x0f" + RAW + b"garbage"),
        (schema.MISSING_IMAGE, _example(label=1, user=uid + b"1")),
        (schema.EMPTY_IMAGE, _example(image=b"", label=1, user=uid + b"2")),
        (schema.UNDECODABLE_IMAGE, _example(image=b"these bytes are no image", label=1,
                                            user=uid + b"3")),
        (schema.UNDECODABLE_IMAGE, _example(image=img[: len(img) // 2], label=1, user=uid + b"4")),
        (schema.BAD_CHANNELS, _example(image=_png(np.zeros((28, 28, 2), np.uint8)), label=1,
                                       user=uid + b"5")),  # LA: grey + alpha
        (schema.BAD_CHANNELS, _example(image=_png(np.zeros((28, 28, 4), np.uint8)), label=1,
                                       user=uid + b"6")),  # RGBA
        (schema.OVERSIZE_IMAGE, _example(image=schema.encode_image(np.zeros((80, 30), np.uint8)),
                                         label=1, user=uid + b"7")),
        (schema.MISSING_LABEL, _example(image=img, user=uid + b"8")),
        (schema.LABEL_NOT_INT64, _example(image=img, label=1.0, label_kind="float",
                                          user=uid + b"9")),
        (schema.MULTIPLE_LABELS, _example(image=img, label=[1, 2], user=uid + b"10")),
        (schema.NEGATIVE_LABEL, _example(image=img, label=-3, user=uid + b"11")),
        (schema.MISSING_USER_ID, _example(image=img, label=1)),
        (schema.EMPTY_USER_ID, _example(image=img, label=1, user=b"")),
        (schema.USER_ID_TOO_LONG, _example(image=img, label=1, user=RAW + b"x" * 100)),
        (schema.USER_ID_NOT_BYTES, _example(image=img, label=1, user=12345, user_kind="int")),
    ]


def _valid_records(rng: np.random.Generator) -> list[tuple[bytes, int, bytes]]:
    """(raw user id, label, image) for every valid record; every image distinct."""
    out = []
    for u, size in enumerate(USER_SIZES):
        for _ in range(size):
            img = schema.encode_image(rng.integers(0, 255, (28, 28), dtype=np.uint8))
            out.append((RAW + b"%02d" % u, int(rng.integers(0, 6)), img))
    return out


def _write_files(directory: str, recs: list[bytes], num_files: int) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"part-{i}.tfrecord") for i in range(num_files)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i, r in enumerate(recs):
        writers[i % num_files].write(r)
    for w in writers:
        w.close()
    return paths


class _LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Valid records with every kind of bad record between them, in three files."""
    rng = np.random.default_rng(0)
    valid = _valid_records(rng)
    bad = _bad_records(rng)
    recs = [schema.make_example(img, label, uid) for uid, label, img in valid]
    for i, (_, rec) in enumerate(bad):
        recs.insert(2 * i + 1, rec)  # surrounded by valid records
    root = tmp_path_factory.mktemp("corpus")
    _write_files(str(root / "in"), recs, NUM_FILES)
    return {"root": root, "glob": str(root / "in" / "*.tfrecord"), "valid": valid, "bad": bad,
            "records": recs}


@pytest.fixture(scope="module")
def run(corpus: dict[str, Any]) -> dict[str, Any]:
    """One partition run of the corpus, with every log line it produced."""
    out = str(corpus["root"] / "out")
    collector, root = _LogCollector(), logging.getLogger()
    level = root.level
    root.addHandler(collector)
    root.setLevel(logging.DEBUG)
    try:
        stats = partition.run_partition(corpus["glob"], out, CFG, KEY)
    finally:
        root.removeHandler(collector)
        root.setLevel(level)
    return {"out": out, "stats": stats, "logs": collector.lines,
            "manifest": partition.load_manifest(out)}


def _expected_kept(valid: list[tuple[bytes, int, bytes]]) -> dict[str, list[bytes]]:
    """pseudonym -> kept records, by the documented rule, computed independently of Beam."""
    by_user: dict[str, list[bytes]] = collections.defaultdict(list)
    for uid, label, img in valid:
        p = partition.pseudonymize(KEY, uid)
        by_user[p].append(schema.make_example(img, label, p.encode()))
    return {p: sorted(exs, key=lambda e: hashlib.sha256(b"cap" + CFG.seed.to_bytes(8, "big")
                                                        + e).digest())[:CFG.max_examples_per_user]
            for p, exs in by_user.items() if len(exs) >= CFG.min_examples_per_user}


def _client_contents(out: str, manifest: dict[str, Any]) -> dict[str, list[bytes]]:
    return {cid: list(records.iter_records([partition.client_file(out, cid)]))
            for cid in manifest["clients"]}


def _all_files(directory: str) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), directory): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(directory) for n in names}


def test_every_kind_of_bad_record_is_dead_lettered_with_its_reason(corpus, run) -> None:
    letters = partition.read_dead_letters(run["out"])
    expected = collections.Counter(reason for reason, _ in corpus["bad"])
    assert collections.Counter(d["reason"] for d in letters) == expected
    assert set(expected) == set(schema.REASONS)
    assert run["stats"]["dead_lettered_by_reason"] == {r: expected.get(r, 0) for r in schema.REASONS}
    sources = {}
    for path in storage.glob(corpus["glob"]):
        sources[path] = list(records.iter_records([path]))
    for d in letters:
        original = sources[d["source_file"]][d["record_index"]]
        assert hashlib.sha256(original).hexdigest() == d["record_sha256"]
        assert len(original) == d["record_bytes"]
        if d["reason"] == schema.NOT_AN_EXAMPLE:
            assert d["record"] is None  # cannot be scrubbed, so withheld
        elif d["reason"] != schema.USER_ID_TOO_LONG:  # its pseudonym is short enough to pass
            with pytest.raises(schema.InvalidRecord) as err:
                schema.parse_record(d["record"], max_image_side=CFG.max_image_side,
                                    allowed_channels=CFG.allowed_channels,
                                    max_user_id_bytes=CFG.max_user_id_bytes)
            assert err.value.reason == d["reason"]


def test_counts_are_exact_and_conserved(corpus, run) -> None:
    s = run["stats"]
    kept = _expected_kept(corpus["valid"])
    n_valid = len(corpus["valid"])
    dropped = [n for n in USER_SIZES if n < CFG.min_examples_per_user]
    assert s["records_in"] == len(corpus["records"])
    assert s["valid"] == n_valid
    assert s["dead_lettered"] == len(corpus["bad"])
    assert s["examples_kept"] == sum(len(v) for v in kept.values())
    assert s["examples_over_cap"] == sum(max(0, n - CFG.max_examples_per_user) for n in USER_SIZES)
    assert (s["users_dropped"], s["examples_of_dropped_users"]) == (len(dropped), sum(dropped))
    assert s["users"] == len(kept)
    assert s["records_in"] == (s["examples_kept"] + s["examples_over_cap"]
                               + s["examples_of_dropped_users"] + s["dead_lettered"])
    assert s["virtual_clients"] == len(run["manifest"]["clients"]) == 4  # round(7 / 2)
    assert s["config"]["seed"] == CFG.seed
    on_disk = json.loads(open(os.path.join(run["out"], partition.STATS)).read())
    assert on_disk == json.loads(json.dumps(s))


def test_conservation_failure_raises() -> None:
    counts = {"records_in": 10, "valid": 9, partition._DEAD_PREFIX + schema.EMPTY_IMAGE: 1,
              "examples_kept": 7, "examples_over_cap": 1, "users": 1}
    clients = {"vc-000000": partition.client_entry(1, [0], 7, "vc-000000")}
    with pytest.raises(partition.PartitionError, match="not conserved"):
        partition.build_stats(counts, clients, PartitionConfig(), "x", 1)
    counts["examples_over_cap"] = 2
    assert partition.build_stats(counts, clients, PartitionConfig(), "x", 1)["users"] == 1


def test_each_user_in_exactly_one_client_and_manifest_matches_files(corpus, run) -> None:
    manifest, out = run["manifest"], run["out"]
    assert (manifest["format_version"], manifest["users_per_client"], manifest["seed"]) == (1, 2, 7)
    clients_of: dict[str, set[str]] = collections.defaultdict(set)
    for cid, recs in _client_contents(out, manifest).items():
        entry = manifest["clients"][cid]
        assert entry["file"] == f"clients/{cid}.tfrecord"
        parsed = [schema.parse_record(r) for r in recs]
        users = {r.user_id.decode() for r in parsed}
        for u in users:
            clients_of[u].add(cid)
        labels = sorted({r.label for r in parsed})
        assert (entry["users"], entry["examples"], entry["labels"], entry["classes"]) == (
            len(users), len(recs), labels, len(labels))
        assert CFG.users_per_client - 1 <= entry["users"] <= CFG.users_per_client + 1
    assert set(clients_of) == set(_expected_kept(corpus["valid"]))
    assert all(len(c) == 1 for c in clients_of.values())


def test_cap_keeps_smallest_hashes_and_minimum_drops_users(corpus, run) -> None:
    kept: dict[str, list[bytes]] = collections.defaultdict(list)
    for recs in _client_contents(run["out"], run["manifest"]).values():
        for r in recs:
            kept[schema.parse_record(r).user_id.decode()].append(r)
    assert dict(kept) == _expected_kept(corpus["valid"])


def test_same_kept_set_and_manifest_for_shuffled_input(corpus, run, tmp_path) -> None:
    recs = list(corpus["records"])
    random.Random(1).shuffle(recs)
    _write_files(str(tmp_path / "in"), recs, NUM_FILES + 1)
    out = str(tmp_path / "out")
    partition.run_partition(str(tmp_path / "in" / "*.tfrecord"), out, CFG, KEY)
    assert partition.load_manifest(out) == run["manifest"]
    assert (_all_files(os.path.join(out, "clients"))
            == _all_files(os.path.join(run["out"], "clients")))


def test_rerun_is_deterministic(corpus, run, tmp_path) -> None:
    out = str(tmp_path / "out")
    partition.run_partition(corpus["glob"], out, CFG, KEY)
    assert open(os.path.join(out, partition.MANIFEST), "rb").read() == open(
        os.path.join(run["out"], partition.MANIFEST), "rb").read()


def test_no_raw_id_or_key_in_any_output_or_log(run) -> None:
    files = _all_files(run["out"])
    assert {"manifest.json", "stats.json", "_COMPLETE"} <= set(files)
    assert any(f.startswith("dead_letter/") for f in files)
    for name, data in files.items():
        assert RAW not in data, name
        assert partition.INSECURE_TEST_KEY not in data, name
    assert run["logs"] and not any("RAWUSER" in line for line in run["logs"])
    assert not any(partition.INSECURE_TEST_KEY.decode() in line for line in run["logs"])


def _cut_mid_record(b: bytes) -> bytes:
    return b[:-7]


def _cut_mid_header(b: bytes) -> bytes:
    first = int.from_bytes(b[:8], "little") + 16
    return b[:first + 5]  # TensorFlow's reader alone would take this as a clean end


def _flip_byte(b: bytes) -> bytes:
    return b[:40] + bytes([b[40] ^ 1]) + b[41:]


@pytest.mark.parametrize("damage", [_cut_mid_record, _cut_mid_header, _flip_byte])
def test_broken_framing_fails_naming_the_file_and_publishes_nothing(
        corpus, tmp_path, damage: Callable[[bytes], bytes]) -> None:
    src = tmp_path / "in"
    shutil.copytree(corpus["root"] / "in", src)
    broken = src / "part-1.tfrecord"
    broken.write_bytes(damage(broken.read_bytes()))
    new_out, old_out = tmp_path / "new", tmp_path / "old"
    old_out.mkdir()
    (old_out / "sentinel").write_text("previous run")
    for out in (new_out, old_out):
        with pytest.raises(partition.PartitionError, match=re.escape(str(broken))):
            partition.run_partition(str(src / "*.tfrecord"), str(out), CFG, KEY)
    assert not new_out.exists()
    assert (old_out / "sentinel").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "old"]  # no staging dir left


def test_multi_processing_direct_runner_gives_the_same_partition(corpus, run, tmp_path) -> None:
    out = str(tmp_path / "out")
    stats = partition.run_partition(
        corpus["glob"], out, CFG, KEY,
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert stats == run["stats"]
    assert partition.load_manifest(out) == run["manifest"]


def test_readers(run, tmp_path) -> None:
    out = run["out"]
    for cid, entry in run["manifest"]["clients"].items():
        assert partition.client_file(out, cid) == os.path.join(out, entry["file"])
    with pytest.raises(ValueError):
        partition.client_file(out, "../etc/passwd")
    (tmp_path / "half").mkdir()
    with pytest.raises(storage.StorageError, match="incomplete"):
        partition.load_manifest(str(tmp_path / "half"))


def test_client_assignment_rule() -> None:
    for n, k in [(1, 1), (7, 2), (50, 10), (51, 10), (1000, 7), (3, 10)]:
        users = [f"{i:032x}" for i in range(n)]
        a = partition.assign_clients(users, k, seed=3)
        assert set(a) == set(users)
        sizes = collections.Counter(a.values())
        assert len(sizes) == partition.num_clients(n, k) == max(1, round(n / k + 1e-9))
        assert max(sizes.values()) - min(sizes.values()) <= 1
        if len(sizes) >= k / 2:
            assert all(k - 1 <= s <= k + 1 for s in sizes.values()), (n, k, sizes)
        assert a == partition.assign_clients(reversed(users), k, seed=3)
    users = [f"{i:032x}" for i in range(100)]
    assert partition.assign_clients(users, 5, 1) != partition.assign_clients(users, 5, 2)
    assert partition.num_clients(0, 3) == 0


def test_resolve_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "key"
    f.write_bytes(b"0123456789abcdef0123\n")
    assert partition.resolve_key(str(f), False, {}) == b"0123456789abcdef0123"
    assert partition.resolve_key(None, False, {partition.KEY_ENV: "k" * 16}) == b"k" * 16
    assert partition.resolve_key(None, True, {}) == partition.INSECURE_TEST_KEY
    with pytest.raises(ConfigError, match=f"--pseudonym-key-file.*{partition.KEY_ENV}"):
        partition.resolve_key(None, False, {})
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        partition.resolve_key(None, False, {partition.KEY_ENV: "short"})


def test_pipeline_options_default_to_the_local_engine() -> None:
    std = partition.StandardOptions
    assert partition.pipeline_options(None).view_as(std).runner == "FnApiRunner"
    opts = partition.pipeline_options(["--runner", "DataflowRunner", "--project", "p"])
    assert opts.view_as(std).runner == "DataflowRunner"


def test_cli(corpus, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv(partition.KEY_ENV, raising=False)
    base = ["--input", corpus["glob"], "--output", str(tmp_path / "out")]
    assert partition.main(base) == 2
    assert "--pseudonym-key-file" in capsys.readouterr().err
    assert partition.main(base + ["--insecure-test-key", "--min-examples-per-user", "0"]) == 2
    assert "min_examples_per_user" in capsys.readouterr().err
    assert partition.main(base + ["--insecure-test-key", "--users-per-clint", "3"]) == 2
    assert partition.main(base + ["--insecure-test-key", "--users-per-client", "3",
                                  "--direct_num_workers=1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["virtual_clients"] == partition.num_clients(summary["users"], 3)
    assert partition.load_manifest(str(tmp_path / "out"))["users_per_client"] == 3
