"""Paths that are local or ``gs://``: reading, atomic writing and atomic publishing.

Everything goes through ``tf.io.gfile`` so one code path serves local disks and Cloud Storage.
Writers never leave half-written output where a reader looks: a file is written under a temporary
name and renamed; a directory is built under a staging name, renamed into place, and carries a
``_COMPLETE`` marker written last (object stores have no atomic directory rename, so readers
require the marker).
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any, Iterator

import tensorflow as tf

COMPLETE_MARKER = "_COMPLETE"


class StorageError(OSError):
    """An I/O failure, with the path that failed and what to check."""


def join(*parts: str) -> str:
    """Join path parts for local or gs:// paths."""
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]]) if parts else ""


@contextlib.contextmanager
def _named(path: str, action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (tf.errors.OpError, OSError) as e:
        msg = getattr(e, "message", None) or str(e)
        raise StorageError(f"cannot {action} {path}: {msg.strip()} "
                           "(check that the path exists, is writable and has free space)") from e


def exists(path: str) -> bool:
    with _named(path, "check"):
        return tf.io.gfile.exists(path)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob; a pattern without wildcards matches itself when it exists."""
    with _named(pattern, "list"):
        return sorted(tf.io.gfile.glob(pattern))


def makedirs(path: str) -> None:
    with _named(path, "create directory"):
        tf.io.gfile.makedirs(path)


def read_bytes(path: str) -> bytes:
    with _named(path, "read"):
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()


def read_json(path: str) -> Any:
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"{path} is not valid JSON ({e}); it may be truncated or not ours") from e


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    parent = os.path.dirname(path)
    if parent:
        makedirs(parent)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with _named(path, "write"):
        try:
            with tf.io.gfile.GFile(tmp, "wb") as f:
                f.write(data)
            tf.io.gfile.rename(tmp, path, overwrite=True)
        finally:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def remove_tree(path: str) -> None:
    with _named(path, "remove"):
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        elif tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)


def staging_dir(final_dir: str) -> str:
    """A fresh sibling directory to build ``final_dir`` in before :func:`publish_dir`."""
    return f"{final_dir.rstrip('/')}.tmp-{uuid.uuid4().hex}"


def publish_dir(staging: str, final_dir: str) -> None:
    """Move a fully written staging directory into place and mark it complete.

    An existing ``final_dir`` is replaced. The marker is written last, so a reader that requires it
    (:func:`require_complete`) never sees a partial directory, even on object stores.
    """
    final_dir = final_dir.rstrip("/")
    with _named(final_dir, "publish"):
        if tf.io.gfile.exists(final_dir):
            tf.io.gfile.rmtree(final_dir)
        parent = os.path.dirname(final_dir)
        if parent:
            tf.io.gfile.makedirs(parent)
        if final_dir.startswith("gs://"):
            # Object stores have no directory rename: copy object by object, marker last.
            for root, _, files in tf.io.gfile.walk(staging):
                rel = root[len(staging):].lstrip("/")
                for name in files:
                    dst = join(final_dir, rel, name) if rel else join(final_dir, name)
                    tf.io.gfile.copy(join(root, name), dst, overwrite=True)
            tf.io.gfile.rmtree(staging)
        else:
            tf.io.gfile.rename(staging, final_dir)
    write_bytes_atomic(join(final_dir, COMPLETE_MARKER), b"ok\n")


def is_complete(path: str) -> bool:
    return exists(join(path, COMPLETE_MARKER))


def require_complete(path: str, what: str) -> None:
    """Fail clearly when ``path`` is missing or was never fully published."""
    if not exists(path):
        raise StorageError(f"{what} not found at {path}: check the path or run the step that makes it")
    if not is_complete(path):
        raise StorageError(f"{what} at {path} is incomplete (no {COMPLETE_MARKER} marker): the step "
                           "that writes it did not finish; rerun it")
