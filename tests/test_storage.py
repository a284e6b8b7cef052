"""Storage: atomic writes and publishing, and clear errors naming the path."""
import errno
import os

import pytest
import tensorflow as tf

from dpfedemb import storage


def test_atomic_write_and_json_round_trip(tmp_path):
    p = str(tmp_path / "a" / "b.json")
    storage.write_json_atomic(p, {"x": 1})
    assert storage.read_json(p) == {"x": 1}
    assert os.listdir(tmp_path / "a") == ["b.json"]


def test_publish_dir_is_all_or_nothing(tmp_path):
    final = str(tmp_path / "out")
    stage = storage.staging_dir(final)
    storage.makedirs(stage)
    storage.write_bytes_atomic(os.path.join(stage, "f"), b"1")
    with pytest.raises(storage.StorageError, match="not found"):
        storage.require_complete(final, "partition")
    storage.publish_dir(stage, final)
    storage.require_complete(final, "partition")
    assert sorted(os.listdir(final)) == [storage.COMPLETE_MARKER, "f"]
    os.remove(os.path.join(final, storage.COMPLETE_MARKER))
    with pytest.raises(storage.StorageError, match="incomplete"):
        storage.require_complete(final, "partition")


def test_unwritable_path_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = str(blocker / "sub" / "out.json")
    with pytest.raises(storage.StorageError) as e:
        storage.write_json_atomic(target, {"x": 1})
    assert str(blocker) in str(e.value)


def test_disk_full_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    real = tf.io.gfile.GFile

    class Full(real):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tf.io.gfile, "GFile", Full)
    target = str(tmp_path / "m.json")
    with pytest.raises(storage.StorageError) as e:
        storage.write_json_atomic(target, {"x": 1})
    assert target in str(e.value) and "space" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(storage.StorageError, match="nope"):
        storage.read_bytes(str(tmp_path / "nope"))
    bad = tmp_path / "bad.json"
    bad.write_text("{truncated")
    with pytest.raises(storage.StorageError, match="not valid JSON"):
        storage.read_json(str(bad))
