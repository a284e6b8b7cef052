"""Lifetime privacy ledger: every private phase ever run over one user population.

Scheduled retraining over the same users composes: each run spends more of the users' privacy.
The ledger is one JSON document per population, at a local path or ``gs://bucket/object``::

    {"format_version": 1, "population_id": "...", "delta": 1e-6,
     "entries": [{"entry_id": "RUN/PHASE", "run_id": "...", "pipeline_job": "...",
                  "time": "2026-01-01T00:00:00+00:00", "phase": "train",
                  "mechanism": {privacy.Mechanism fields}, "rounds_run": 200,
                  "epsilon_of_phase": 1.23 or "inf"}, ...]}

Before a run, :func:`check_budget` refuses when the planned phases would take the population's
lifetime epsilon (all entries composed with :func:`privacy.epsilon_of` at the population's delta)
past the lifetime budget; after a phase, :func:`append` records what ran. Appends are
read-modify-write, safe under concurrent writers (local: ``flock`` on a sidecar ``.lock`` file and
an atomic rename; gs://: object generation preconditions, retried on 412) and idempotent on
``entry_id``, so a resumed or retried step never counts a phase twice.
CLI: ``python -m dpfedemb.ledger show URI`` prints the entries and the lifetime epsilon as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator, Optional, Sequence

from dpfedemb import privacy
from dpfedemb.config import ConfigError
from dpfedemb.storage import StorageError

FORMAT_VERSION = 1
ENTRY_KEYS = ("entry_id", "run_id", "pipeline_job", "time", "phase", "mechanism", "rounds_run",
              "epsilon_of_phase")
_MECH_FIELDS = tuple(f.name for f in dataclasses.fields(privacy.Mechanism))


class LifetimeBudgetExceeded(ValueError):
    """The planned phases would take the population past its lifetime epsilon budget."""


class LedgerMismatch(ValueError):
    """The ledger belongs to another population or uses another delta than the caller."""


# --- entries and accounting -------------------------------------------------------------------

def mechanism_of(stored: dict[str, Any]) -> privacy.Mechanism:
    """A privacy.Mechanism from stored fields (extra keys, e.g. from ``to_dict``, are ignored)."""
    return privacy.Mechanism(**{k: stored[k] for k in _MECH_FIELDS if k in stored})


def make_entry(run_id: str, pipeline_job: str, phase: str, mechanism: privacy.Mechanism,
               rounds_run: int, when: Optional[datetime.datetime] = None) -> dict[str, Any]:
    """A ledger entry for one phase of one run; its entry_id is ``run_id/phase``."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return {"entry_id": f"{run_id}/{phase}", "run_id": run_id, "pipeline_job": pipeline_job,
            "time": when.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
            "phase": phase, "mechanism": dataclasses.asdict(mechanism),
            "rounds_run": int(rounds_run),
            "epsilon_of_phase": privacy.epsilon_json(privacy.epsilon(mechanism, rounds_run))}


def entries_from_privacy_record(record: dict[str, Any], run_id: str,
                                pipeline_job: str) -> list[dict[str, Any]]:
    """One entry per phase of a privacy.json record (train.privacy_record's ``phases``)."""
    return [make_entry(run_id, pipeline_job, ph["phase"], mechanism_of(ph), int(ph["rounds_run"]))
            for ph in record.get("phases", [])]


def lifetime_epsilon(entries: Iterable[dict[str, Any]], delta: float,
                     extra: Sequence[tuple[privacy.Mechanism, int]] = ()) -> float:
    """Epsilon at ``delta`` of all entries composed, plus ``extra`` planned (mechanism, rounds).

    Infinite when any non-private phase (noise multiplier 0) ran or is planned with rounds > 0.
    """
    mechs = [(mechanism_of(e["mechanism"]), int(e["rounds_run"])) for e in entries]
    return privacy.epsilon_of(mechs + list(extra), delta)


def _validate_entry(entry: dict[str, Any]) -> None:
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        raise ValueError(f"ledger entry lacks {missing}; build entries with make_entry()")
    if not isinstance(entry["entry_id"], str) or not entry["entry_id"]:
        raise ValueError(f"ledger entry_id must be a non-empty string, got {entry['entry_id']!r}")
    rounds = entry["rounds_run"]
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise ValueError(f"ledger entry {entry['entry_id']!r}: rounds_run={rounds!r} must be an "
                         "integer >= 0")
    eps = entry["epsilon_of_phase"]
    if not (eps == "inf" or (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                             and math.isfinite(eps) and eps >= 0)):
        raise ValueError(f"ledger entry {entry['entry_id']!r}: epsilon_of_phase={eps!r} must be a "
                         'number >= 0 or "inf"')
    try:
        mechanism_of(entry["mechanism"])
    except (ConfigError, TypeError) as e:
        raise ValueError(f"ledger entry {entry['entry_id']!r} has an invalid mechanism: {e}") from e


def _empty(population_id: Optional[str], delta: Optional[float]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "population_id": population_id, "delta": delta,
            "entries": []}


def _check_doc(doc: Any, uri: str, population_id: Optional[str],
               delta: Optional[float]) -> dict[str, Any]:
    if not (isinstance(doc, dict) and isinstance(doc.get("entries"), list)
            and "population_id" in doc and "delta" in doc):
        raise StorageError(f"{uri} is not a privacy ledger (expected an object with "
                           "population_id, delta and entries)")
    if doc.get("format_version") != FORMAT_VERSION:
        raise StorageError(f"{uri} has ledger format_version {doc.get('format_version')!r}; this "
                           f"code reads version {FORMAT_VERSION}")
    if population_id is not None and doc["population_id"] != population_id:
        raise LedgerMismatch(f"ledger {uri} belongs to population {doc['population_id']!r}, not "
                             f"{population_id!r}: use one ledger per population")
    if delta is not None and doc["delta"] is not None and doc["delta"] != delta:
        raise LedgerMismatch(f"ledger {uri} of population {doc['population_id']!r} accounts at "
                             f"delta={doc['delta']!r}, but the caller uses delta={delta!r}: a "
                             "population has one delta for its lifetime")
    return doc


def _parse(data: Optional[bytes], uri: str) -> Optional[dict[str, Any]]:
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"{uri} is not valid JSON ({e}); it may be truncated or not a ledger") \
            from e


def _encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


# --- local files ------------------------------------------------------------------------------

@contextlib.contextmanager
def _local_errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise StorageError(f"cannot {action} ledger {uri}: {e.strerror or e} (check that the "
                           "directory exists and is writable)") from e


def _read_local(path: str) -> Optional[bytes]:
    with _local_errors(path, "read"):
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None


def _append_local(path: str, population_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    with _local_errors(path, "update"):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
            doc, changed = _merged(_parse(_read_local(path), path), path, population_id, entry)
            if not changed:
                return doc
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(path) + ".",
                                       suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_encode(doc))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return doc


# --- gs:// --------------------------------------------------------------------------------------

def gcs_client() -> Any:
    """A google-cloud-storage client; anonymous against an emulator at STORAGE_EMULATOR_HOST."""
    from google.cloud import storage as gcs
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials
        return gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"),
                          credentials=AnonymousCredentials())
    return gcs.Client()


def _split_gs(uri: str) -> tuple[str, str]:
    bucket, _, name = uri[len("gs://"):].partition("/")
    if not bucket or not name or name.endswith("/"):
        raise StorageError(f"invalid ledger URI {uri}: expected gs://BUCKET/OBJECT")
    return bucket, name


@contextlib.contextmanager
def _gcs_errors(uri: str, action: str) -> Iterator[None]:
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc
    try:
        yield
    except (gexc.PreconditionFailed, StorageError):
        raise
    except gexc.Forbidden as e:
        raise StorageError(f"cannot {action} ledger {uri}: permission denied ({e.message}); it "
                           "needs storage.objects.get, list, create and delete on the bucket") \
            from e
    except gexc.NotFound as e:
        raise StorageError(f"cannot {action} ledger {uri}: not found ({e.message}); check that "
                           "the bucket exists") from e
    except (gexc.GoogleAPIError, auth_exc.GoogleAuthError, OSError) as e:
        raise StorageError(f"cannot {action} ledger {uri}: {e}") from e


def _read_gcs(client: Any, uri: str) -> tuple[Optional[bytes], int]:
    """The object's bytes and generation; (None, 0) when the object (not the bucket) is missing."""
    from google.api_core import exceptions as gexc
    bucket, name = _split_gs(uri)
    blob = client.bucket(bucket).blob(name)
    with _gcs_errors(uri, "read"):
        try:
            data = blob.download_as_bytes()
        except gexc.NotFound:
            # A missing object is an empty ledger; a missing bucket is an error (listing needs the
            # same object-level permission as reading, unlike a bucket metadata GET).
            list(client.list_blobs(bucket, prefix=name, max_results=1))
            return None, 0
    if blob.generation is None:
        raise StorageError(f"cannot read ledger {uri}: the download reported no object generation")
    return data, int(blob.generation)


def _append_gcs(uri: str, population_id: str, entry: dict[str, Any], attempts: int,
                ) -> dict[str, Any]:
    from google.api_core import exceptions as gexc
    bucket, name = _split_gs(uri)
    with _gcs_errors(uri, "open"):
        client = gcs_client()
    for attempt in range(attempts):
        data, generation = _read_gcs(client, uri)
        doc, changed = _merged(_parse(data, uri), uri, population_id, entry)
        if not changed:
            return doc
        try:
            with _gcs_errors(uri, "write"):
                client.bucket(bucket).blob(name).upload_from_string(
                    _encode(doc), content_type="application/json", if_generation_match=generation)
            return doc
        except gexc.PreconditionFailed:  # another writer got in between: read again
            time.sleep(random.uniform(0, min(2.0, 0.05 * 2 ** attempt)))
    raise StorageError(f"cannot update ledger {uri}: it changed under us on each of {attempts} "
                       "attempts (too many concurrent writers?)")


# --- public API -------------------------------------------------------------------------------

def _merged(doc: Optional[dict[str, Any]], uri: str, population_id: str,
            entry: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(``doc`` with ``entry`` added, True), or (``doc``, False) when its entry_id is there."""
    delta = entry["mechanism"]["delta"]
    doc = _check_doc(doc if doc is not None else _empty(population_id, delta), uri,
                     population_id, delta)
    if any(e.get("entry_id") == entry["entry_id"] for e in doc["entries"]):
        return doc, False
    return {**doc, "entries": doc["entries"] + [dict(entry)]}, True


def read(uri: str, population_id: Optional[str] = None,
         delta: Optional[float] = None) -> dict[str, Any]:
    """The ledger document at ``uri``; an empty ledger when it does not exist yet.

    Raises :class:`LedgerMismatch` when ``population_id`` or ``delta`` (if given) differ from the
    stored ones, and StorageError naming the URI when it cannot be read or is not a ledger.
    """
    if uri.startswith("gs://"):
        with _gcs_errors(uri, "open"):
            client = gcs_client()
        data, _ = _read_gcs(client, uri)
    else:
        data = _read_local(uri)
    doc = _parse(data, uri)
    return _check_doc(doc if doc is not None else _empty(population_id, delta), uri,
                      population_id, delta)


def append(uri: str, population_id: str, entry: dict[str, Any], *,
           attempts: int = 30) -> dict[str, Any]:
    """Record one phase that ran; returns the ledger document after the append.

    Idempotent on ``entry["entry_id"]``: if the ledger already holds that id nothing changes (a
    resumed run must not count twice). Safe against concurrent appends (see the module doc);
    ``attempts`` bounds the gs:// retries after lost races.
    """
    if not isinstance(population_id, str) or not population_id:
        raise ValueError(f"population_id must be a non-empty string, got {population_id!r}")
    _validate_entry(entry)
    if uri.startswith("gs://"):
        return _append_gcs(uri, population_id, entry, attempts)
    return _append_local(uri, population_id, entry)


def check_budget(uri: str, population_id: str, planned: Sequence[tuple[privacy.Mechanism, int]],
                 lifetime_budget: float) -> float:
    """The population's lifetime epsilon after the planned (mechanism, rounds) phases.

    Raises :class:`LifetimeBudgetExceeded` when that would pass ``lifetime_budget``; spends and
    writes nothing either way. All planned mechanisms must use the ledger's delta.
    """
    if not (isinstance(lifetime_budget, (int, float)) and lifetime_budget > 0):
        raise ValueError(f"lifetime_budget must be > 0, got {lifetime_budget!r}")
    if not planned:
        raise ValueError("check_budget needs at least one planned (mechanism, rounds) phase")
    deltas = {m.delta for m, _ in planned}
    if len(deltas) > 1:
        raise LedgerMismatch(f"planned phases use several deltas {sorted(deltas)}; a population "
                             "has one delta for its lifetime")
    delta = deltas.pop()
    doc = read(uri, population_id, delta)
    current = lifetime_epsilon(doc["entries"], delta)
    would_be = lifetime_epsilon(doc["entries"], delta, planned)
    if would_be > lifetime_budget:
        raise LifetimeBudgetExceeded(
            f"lifetime privacy budget of population {population_id!r} would be exceeded: lifetime "
            f"epsilon so far {current:.4g}, after the planned phases {would_be:.4g}, budget "
            f"{lifetime_budget:.4g} (delta={delta!r}, {len(doc['entries'])} recorded phases, "
            f"ledger {uri}); nothing was spent")
    return would_be


def summary(uri: str) -> dict[str, Any]:
    """The ledger with its lifetime epsilon (JSON-ready; infinity is "inf")."""
    doc = read(uri)
    eps = lifetime_epsilon(doc["entries"], doc["delta"]) if doc["entries"] else 0.0
    return {"uri": uri, "population_id": doc["population_id"], "delta": doc["delta"],
            "entries": doc["entries"], "lifetime_epsilon": privacy.epsilon_json(eps)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpfedemb.ledger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="print the entries and the lifetime epsilon").add_argument("uri")
    a = p.parse_args(argv)
    try:
        out = summary(a.uri)
    except (StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
