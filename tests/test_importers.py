"""Importers on tiny generated inputs: outputs, cards, and clear errors without partial output."""
import gzip
import json
import os
import struct

import numpy as np
import pytest

from dpfedemb import storage
from dpfedemb.config import ImageSpec, SimulationConfig
from dpfedemb.data import importers, records
from dpfedemb.data.__main__ import main as data_main


def _idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_dir(tmp_path, tiny_images):
    x, y = tiny_images
    d = tmp_path / "fm"
    d.mkdir()
    _idx(d / "train-images-idx3-ubyte.gz", x)
    _idx(d / "train-labels-idx1-ubyte.gz", y)
    _idx(d / "t10k-images-idx3-ubyte.gz", x[:60])
    _idx(d / "t10k-labels-idx1-ubyte.gz", y[:60])
    return str(d)


def test_fashion_mnist_import_writes_splits_and_card(fmnist_dir, tmp_path, tiny_images, capsys):
    out = str(tmp_path / "data")
    assert data_main(["import", "fashion-mnist", "--source", fmnist_dir, "--output", out,
                      "--public-examples", "20", "--mean-examples-per-user", "10"]) == 0
    card = json.load(open(os.path.join(out, "card.json")))
    s = card["splits"]
    assert (s["public"]["examples"], s["private"]["examples"], s["eval"]["examples"]) == (20, 100, 60)
    assert s["private"]["users"] == 10
    assert 0.0 <= card["raw_pixel_recall_at_1"]["eval"] <= 1.0
    assert card["image"] == {"height": 28, "width": 28, "channels": 1}
    assert len(s["private"]["sha256"]) == 64
    x, y, u = records.load_arrays(records.files_of(os.path.join(out, "private-*")), ImageSpec())
    assert np.array_equal(x[..., 0], tiny_images[0][20:]) and np.array_equal(y, tiny_images[1][20:])
    assert storage.is_complete(out)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_truncated_idx_fails_clearly(fmnist_dir, tmp_path):
    with gzip.open(os.path.join(fmnist_dir, "train-images-idx3-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 100, 28, 28) + b"\0" * 50)
    with pytest.raises(importers.DataImportError, match="truncated"):
        importers.import_fashion_mnist(fmnist_dir, str(tmp_path / "o"), SimulationConfig())
    assert not os.path.exists(tmp_path / "o")


def test_missing_source_names_the_file(tmp_path):
    with pytest.raises(importers.DataImportError, match="dataset-fashion-mnist"):
        importers.load_fashion_mnist(str(tmp_path / "nope"))


def _npz(tmp_path, **arrays):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return str(p)


def test_npz_import_with_holdout_classes(tmp_path, tiny_images):
    x, y = tiny_images
    p = _npz(tmp_path, images=x, labels=y)
    out = str(tmp_path / "o")
    card = importers.import_arrays(*importers.load_npz(p, "images", "labels"), out,
                                   SimulationConfig(mean_examples_per_user=5), source="t",
                                   licence="t", holdout_classes=[4, 5], public_fraction=0.2)
    assert card["splits"]["eval"]["classes"] == [4, 5]
    assert set(card["splits"]["private"]["classes"]) <= {0, 1, 2, 3}
    total = sum(v["examples"] for v in card["splits"].values())
    assert total == len(y)


@pytest.mark.parametrize("arrays,keys,match", [
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(3, int)}, ("pics", "labels"),
     "has no array 'pics'"),
    ({"images": np.zeros((3, 4, 4), np.float32), "labels": np.zeros(3, int)}, ("images", "labels"),
     "uint8"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0, -1, 2])}, ("images", "labels"),
     "out of range"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0.5, 1, 2])}, ("images", "labels"),
     "integers"),
])
def test_npz_bad_input_names_the_problem(tmp_path, arrays, keys, match):
    p = _npz(tmp_path, **arrays)
    with pytest.raises(importers.DataImportError, match=match):
        importers.load_npz(p, *keys)


def test_npz_cli_error_and_no_output(tmp_path, capsys):
    out = tmp_path / "o"
    assert data_main(["import", "npz", "--path", str(tmp_path / "missing.npz"),
                      "--output", str(out)]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()


def test_folder_tree_and_manifest(tmp_path):
    from dpfedemb.data import schema
    root = tmp_path / "imgs"
    for user in ("ann", "bob"):
        for label in ("0", "3"):
            d = root / user / label
            d.mkdir(parents=True)
            (d / "a.png").write_bytes(schema.encode_image(np.full((10, 10), 5, np.uint8)))
    card = importers.import_folder(str(tmp_path / "o1"), root=str(root))
    assert card["splits"]["private"]["users"] == 2 and card["splits"]["private"]["classes"] == [0, 3]
    (tmp_path / "m.csv").write_text("path,label,user_id\nimgs/ann/0/a.png,0,ann\nimgs/bob/3/a.png,3,bob\n")
    card = importers.import_folder(str(tmp_path / "o2"), manifest=str(tmp_path / "m.csv"))
    assert card["splits"]["private"]["examples"] == 2


def test_empty_folder_fails_without_output(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(importers.DataImportError, match="holds no images"):
        importers.import_folder(str(tmp_path / "o"), root=str(tmp_path / "empty"))
    assert not (tmp_path / "o").exists()


def test_failure_midway_leaves_no_partial_output(tmp_path, tiny_images, monkeypatch):
    x, y = tiny_images

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(importers, "raw_pixel_recall", boom)
    with pytest.raises(RuntimeError):
        importers.import_arrays(x, y, None, str(tmp_path / "o"), SimulationConfig(), source="t",
                                licence="t", eval_fraction=0.3)
    assert os.listdir(tmp_path) == []


def test_record_reader_matches_tensorflow_and_detects_damage(tmp_path):
    from dpfedemb import storage
    recs = [b"a" * n for n in (0, 1, 100, 5000)]
    [path] = records.write_shards(recs, str(tmp_path), "x", 1)
    assert list(records.read_file_records(path)) == recs
    data = open(path, "rb").read()
    for name, damaged in (("cut", data[:-3]), ("header", data[:len(data) - 5004 - 9]),
                          ("flip", data[:30] + bytes([data[30] ^ 1]) + data[31:])):
        bad = tmp_path / f"{name}.tfrecord"
        bad.write_bytes(damaged)
        with pytest.raises(storage.StorageError, match=str(bad)):
            list(records.read_file_records(str(bad)))
