"""Importers from public data sets into schema records, with a dataset card.

Sources: Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist``), ``.npz`` arrays, image
folders or a CSV manifest, and scikit-learn's bundled digits (the default public split).

Split protocol (written to the card):
- ``public``: examples with no overlap with the private population, for non-private pretraining;
- ``private``: the user population that DP training protects;
- ``eval``: examples of people outside the population (a test split) and, where classes are held
  out, classes never seen in training.
Every import is atomic: the output directory appears complete (with ``card.json``) or not at all.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import os
import struct
from typing import Mapping, Optional, Sequence

import numpy as np

from dpfedemb import storage
from dpfedemb.config import ImageSpec, SimulationConfig
from dpfedemb.data import records, schema, users
from dpfedemb.evaluate import recall_at_1


class DataImportError(ValueError):
    """Bad importer input: the message names the input and the fix."""


FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) as a numpy array."""
    if not storage.exists(path):
        raise DataImportError(f"{path} not found: install Debian's dataset-fashion-mnist or pass the "
                           "folder holding the IDX files (--source)")
    raw = storage.read_bytes(path)
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except OSError as e:
            raise DataImportError(f"{path} is not valid gzip ({e}); re-download the file") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataImportError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataImportError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def load_fashion_mnist(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images, labels), 'test': (images, labels)} from the IDX files in ``source``."""
    out = {}
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        x = read_idx(storage.join(source, img_name))
        y = read_idx(storage.join(source, lbl_name)).astype(np.int64)
        if len(x) != len(y):
            raise DataImportError(f"{source}: {img_name} has {len(x)} images but {lbl_name} "
                               f"has {len(y)} labels")
        out[split] = (x, y)
    return out


def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images) upscaled to 28x28 uint8.

    Installed with scikit-learn (no download). A different domain from the private data: the
    realistic case where public data only resembles the private population.
    """
    from sklearn.datasets import load_digits
    from PIL import Image

    d = load_digits()
    small = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((20, 20), Image.BILINEAR)) for im in small])
    padded = np.zeros((len(big), 28, 28), np.uint8)
    padded[:, 4:24, 4:24] = big  # MNIST-style: a 20x20 glyph centred in a 28x28 frame
    return padded, d.target.astype(np.int64)


def load_npz(path: str, images_key: str, labels_key: str, users_key: Optional[str] = None
             ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Arrays from an ``.npz`` file, checked: uint8 images (N,H,W[,C]), int labels >= 0."""
    if not storage.exists(path):
        raise DataImportError(f"npz file {path} not found: check --path")
    try:
        data = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    except Exception as e:
        raise DataImportError(f"{path} is not a readable .npz file ({e})") from e
    for key in filter(None, (images_key, labels_key, users_key)):
        if key not in data:
            raise DataImportError(f"{path} has no array {key!r}; its keys are {sorted(data.files)} "
                               "(set --images-key/--labels-key/--users-key)")
    x, y = data[images_key], data[labels_key]
    if x.dtype != np.uint8:
        raise DataImportError(f"{path}[{images_key!r}] has dtype {x.dtype}; images must be uint8 in "
                           "[0, 255] (convert with np.clip(x, 0, 255).astype(np.uint8))")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DataImportError(f"{path}[{images_key!r}] has shape {x.shape}; expected (N, H, W) or "
                           "(N, H, W, 1|3)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataImportError(f"{path}[{labels_key!r}] has dtype {y.dtype}; labels must be integers")
    y = y.astype(np.int64).reshape(-1)
    if len(y) != len(x):
        raise DataImportError(f"{path}: {len(x)} images but {len(y)} labels in {labels_key!r}")
    if len(y) and y.min() < 0:
        raise DataImportError(f"{path}[{labels_key!r}] has label {int(y.min())}: labels must be "
                           ">= 0 (out of range)")
    u = None
    if users_key:
        u = data[users_key].reshape(-1)
        if len(u) != len(x):
            raise DataImportError(f"{path}: {len(x)} images but {len(u)} user ids in {users_key!r}")
    return x, y, u


def load_folder(root: Optional[str] = None, manifest: Optional[str] = None
                ) -> tuple[list[bytes], np.ndarray, list[bytes]]:
    """Encoded images, labels and user ids from ``<root>/<user>/<label>/<file>`` or a CSV
    manifest with columns ``path,label,user_id`` (paths relative to the manifest's folder)."""
    rows: list[tuple[str, str, str]] = []
    if manifest:
        if not storage.exists(manifest):
            raise DataImportError(f"manifest {manifest} not found: check --manifest")
        text = storage.read_bytes(manifest).decode("utf-8")
        reader = csv.DictReader(io.StringIO(text))
        missing = {"path", "label", "user_id"} - set(reader.fieldnames or [])
        if missing:
            raise DataImportError(f"manifest {manifest} lacks column(s) {sorted(missing)}; the header "
                               "must be path,label,user_id")
        base = os.path.dirname(manifest)
        for line in reader:
            p = line["path"]
            rows.append((p if "://" in p or os.path.isabs(p) else storage.join(base, p),
                         line["label"], line["user_id"]))
    elif root:
        if not storage.exists(root):
            raise DataImportError(f"image folder {root} not found: check --root")
        for path in storage.glob(storage.join(root, "*", "*", "*")):
            rel = path[len(root.rstrip("/")) + 1:].split("/")
            rows.append((path, rel[1], rel[0]))
    else:
        raise DataImportError("give --root (a <root>/<user>/<label>/<file> tree) or --manifest (CSV)")
    if not rows:
        raise DataImportError(f"{manifest or root} holds no images: expected files at "
                           "<root>/<user>/<label>/<file> or rows in the manifest")
    images, labels, uids = [], [], []
    for path, label, uid in rows:
        try:
            lab = int(label)
        except ValueError:
            raise DataImportError(f"{path}: label {label!r} is not an integer") from None
        if lab < 0:
            raise DataImportError(f"{path}: label {lab} is out of range (labels must be >= 0)")
        data = storage.read_bytes(path)
        try:
            schema.decode_image(data)
        except Exception:
            raise DataImportError(f"{path} is not a decodable PNG/JPEG image") from None
        images.append(data)
        labels.append(lab)
        uids.append(uid.encode())
    return images, np.asarray(labels, np.int64), uids


def _encode_all(images: Sequence) -> list[bytes]:
    return [im if isinstance(im, bytes) else schema.encode_image(np.asarray(im)) for im in images]


def split_card(files: list[str], labels: np.ndarray, user_ids: Sequence[bytes]) -> dict:
    return {"examples": int(len(labels)), "classes": sorted(int(c) for c in np.unique(labels)),
            "num_classes": int(len(np.unique(labels))), "users": int(len(set(user_ids))),
            "files": [f.rsplit("/", 1)[-1] for f in files], "sha256": records.fingerprint(files)}


def raw_pixel_recall(images: Sequence, labels: np.ndarray, spec: ImageSpec,
                     limit: int = 10_000) -> float:
    """Cosine recall@1 of raw pixels: the floor every learned embedding should beat."""
    arr = np.stack([records.to_spec(schema.decode_image(b) if isinstance(b, bytes)
                                    else np.asarray(b).reshape(*np.shape(b)[:2], -1), spec)
                    for b in images[:limit]]).astype(np.float32)
    return recall_at_1(arr.reshape(len(arr), -1), labels[:limit])[0]


def write_dataset(output: str, splits: Mapping[str, tuple[Sequence, np.ndarray, Sequence[bytes]]],
                  *, source: str, licence: str, spec: ImageSpec, extra: Optional[dict] = None,
                  examples_per_shard: int = 10_000) -> dict:
    """Write each split as TFRecord shards plus ``card.json``, publishing ``output`` atomically."""
    if storage.exists(output) and storage.glob(storage.join(output, "*")):
        if not storage.is_complete(output):
            raise DataImportError(f"{output} exists and is not a finished import: choose an empty "
                               "--output or remove it")
    stage = storage.staging_dir(output)
    try:
        card: dict = {"source": source, "licence": licence,
                      "image": {"height": spec.height, "width": spec.width,
                                "channels": spec.channels},
                      "splits": {}, "raw_pixel_recall_at_1": {}}
        for name, (images, labels, uids) in splits.items():
            enc = _encode_all(images)
            recs = (schema.make_example(im, int(lab), uid) for im, lab, uid in zip(enc, labels, uids))
            n_shards = max(1, -(-len(enc) // examples_per_shard))
            files = records.write_shards(recs, stage, name, n_shards)
            card["splits"][name] = split_card(files, np.asarray(labels), uids)
            if name == "eval" and len(enc):
                card["raw_pixel_recall_at_1"][name] = raw_pixel_recall(enc, np.asarray(labels), spec)
        card.update(extra or {})
        storage.write_json_atomic(storage.join(stage, "card.json"), card)
        storage.publish_dir(stage, output)
        return card
    except BaseException:
        if storage.exists(stage):
            storage.remove_tree(stage)
        raise


def with_simulated_users(labels: np.ndarray, sim: SimulationConfig, prefix: str) -> list[bytes]:
    return users.user_ids(users.simulate_users(labels, sim), prefix)


def import_fashion_mnist(source: str, output: str, sim: SimulationConfig, *,
                         max_train: Optional[int] = None, max_test: Optional[int] = None,
                         public: str = "fashion-mnist", public_examples: int = 2000) -> dict:
    """Private split = Fashion-MNIST train with simulated users; eval = its test split (people
    outside the population); public = sklearn digits (``public='digits'``), the first
    ``public_examples`` of the train split (``'fashion-mnist'``, then not in the private split),
    or none."""
    fm = load_fashion_mnist(source)
    xtr, ytr = fm["train"]
    xte, yte = fm["test"]
    public_part = None
    if public == "fashion-mnist":
        public_part = (xtr[:public_examples], ytr[:public_examples])
        xtr, ytr = xtr[public_examples:], ytr[public_examples:]
    if max_train:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    if max_test:
        xte, yte = xte[:max_test], yte[:max_test]
    splits: dict = {
        "private": (xtr, ytr, with_simulated_users(ytr, sim, "fmnist-user")),
        "eval": (xte, yte, [b"eval-%06d" % i for i in range(len(yte))]),
    }
    if public == "digits":
        xp, yp = load_digits_28()
        splits["public"] = (xp, yp, [b"public"] * len(yp))
    elif public_part is not None:
        splits["public"] = (*public_part, [b"public"] * len(public_part[1]))
    elif public != "none":
        raise DataImportError(f"invalid --public {public!r}: use 'digits', 'fashion-mnist' or 'none'")
    return write_dataset(output, splits, source=f"fashion-mnist:{source}", licence="MIT (Zalando "
                         "Research); digits: BSD-3-Clause (scikit-learn)",
                         spec=ImageSpec(28, 28, 1),
                         extra={"simulation": dataclasses.asdict(sim), "public_source": public,
                                "public_examples": len(splits["public"][1]) if "public" in splits else 0})


def import_arrays(x: np.ndarray, y: np.ndarray, u: Optional[np.ndarray], output: str,
                  sim: SimulationConfig, *, source: str, licence: str,
                  holdout_classes: Sequence[int] = (), eval_fraction: float = 0.0,
                  public_fraction: float = 0.0, invert: bool = False) -> dict:
    """Split arrays by the protocol: held-out classes and a user-disjoint fraction go to ``eval``,
    another user-disjoint fraction to ``public``, the rest is the private population."""
    if invert:
        x = 255 - x
    if u is None:
        uids = np.asarray(with_simulated_users(y, sim, "user"), object)
    else:
        uids = np.asarray([v if isinstance(v, bytes) else str(v).encode() for v in u], object)
    rng = np.random.default_rng(sim.seed)
    held = np.isin(y, np.asarray(list(holdout_classes), np.int64))
    distinct = np.unique(uids[~held])
    order = rng.permutation(len(distinct))
    n_eval = int(round(eval_fraction * len(distinct)))
    n_pub = int(round(public_fraction * len(distinct)))
    eval_users = set(distinct[order[:n_eval]])
    pub_users = set(distinct[order[n_eval:n_eval + n_pub]])
    in_eval = held | np.asarray([v in eval_users for v in uids])
    in_pub = ~in_eval & np.asarray([v in pub_users for v in uids])
    in_priv = ~in_eval & ~in_pub
    spec = ImageSpec(int(x.shape[1]), int(x.shape[2]), 1 if x.ndim == 3 else int(x.shape[3]))
    splits = {name: (x[m], y[m], list(uids[m])) for name, m in
              (("private", in_priv), ("eval", in_eval), ("public", in_pub)) if m.any()}
    return write_dataset(output, splits, source=source, licence=licence, spec=spec,
                         extra={"holdout_classes": sorted(int(c) for c in holdout_classes)})


def import_folder(output: str, *, root: Optional[str] = None, manifest: Optional[str] = None,
                  split: str = "private") -> dict:
    """One split from an image folder tree or CSV manifest (users as given)."""
    images, labels, uids = load_folder(root, manifest)
    first = schema.decode_image(images[0])
    spec = ImageSpec(int(first.shape[0]), int(first.shape[1]), 1 if first.shape[2] == 1 else 3)
    return write_dataset(output, {split: (images, labels, uids)}, source=f"folder:{manifest or root}",
                         licence="as given by the data owner", spec=spec)
