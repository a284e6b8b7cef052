"""TFRecord shards of schema records: sharded writing, reading, and loading into arrays."""
from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Optional

import numpy as np
import tensorflow as tf
from PIL import Image

from dpfedemb import storage
from dpfedemb.config import ImageSpec
from dpfedemb.data import schema


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.tfrecord"


def write_shards(records: Iterable[bytes], directory: str, prefix: str, num_shards: int) -> list[str]:
    """Write serialized records round-robin into ``num_shards`` files; return their paths."""
    storage.makedirs(directory)
    paths = [storage.join(directory, shard_name(prefix, i, num_shards)) for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    try:
        for i, rec in enumerate(records):
            writers[i % num_shards].write(rec)
    finally:
        for w in writers:
            w.close()
    return paths


def iter_records(files: Iterable[str]) -> Iterator[bytes]:
    """Serialized records of the files in order; a corrupt file raises naming the file."""
    for path in files:
        try:
            for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
                yield rec
        except tf.errors.DataLossError as e:
            raise storage.StorageError(f"{path} is not valid TFRecord data (truncated or CRC "
                                       f"error): {e.message.strip()}") from e
        except tf.errors.NotFoundError as e:
            raise storage.StorageError(f"{path} not found") from e


def files_of(pattern: str) -> list[str]:
    """The files a glob names; an empty match is an error that names the glob."""
    files = storage.glob(pattern)
    if not files:
        raise storage.StorageError(f"no files match {pattern}: check the path or run the import "
                                   "step (python -m dpfedemb.data import ...)")
    return files


def fingerprint(files: Iterable[str]) -> str:
    """sha256 over the bytes of the files, in sorted name order (the data set's fingerprint)."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.rsplit("/", 1)[-1].encode())
        h.update(storage.read_bytes(path))
    return h.hexdigest()


def to_spec(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Convert one decoded uint8 image (H, W, C) to the spec's channels and size (resizing)."""
    if pixels.shape[-1] != spec.channels:
        if spec.channels == 1:
            pixels = np.asarray(Image.fromarray(pixels[..., :3] if pixels.shape[-1] >= 3
                                                else pixels[..., 0]).convert("L"))[..., None]
        else:
            pixels = np.repeat(pixels[..., :1], 3, axis=-1)
    if pixels.shape[:2] != (spec.height, spec.width):
        img = Image.fromarray(pixels[..., 0] if spec.channels == 1 else pixels)
        img = img.resize((spec.width, spec.height), Image.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return pixels


def load_arrays(files: Iterable[str], spec: ImageSpec, limit: Optional[int] = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode records into (images uint8 [N,H,W,C] at the spec's size, labels int64, user ids).

    For data that fits in memory (public pretraining, evaluation); records that fail validation
    raise, because these splits are produced by our importers and must be clean.
    """
    images, labels, users = [], [], []
    for rec in iter_records(files):
        r = schema.parse_record(rec, max_image_side=100_000, allowed_channels=(1, 2, 3, 4))
        images.append(to_spec(schema.decode_image(r.image), spec))
        labels.append(r.label)
        users.append(r.user_id)
        if limit is not None and len(labels) >= limit:
            break
    if not labels:
        return (np.zeros((0, spec.height, spec.width, spec.channels), np.uint8),
                np.zeros((0,), np.int64), np.zeros((0,), object))
    return np.stack(images), np.asarray(labels, np.int64), np.asarray(users, object)
