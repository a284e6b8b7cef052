"""TFRecord shards of schema records: sharded writing, reading, and loading into arrays."""
from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Iterator, Optional

import google_crc32c
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


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_file_records(path: str) -> Iterator[bytes]:
    """The records of one TFRecord file, CRCs checked; truncation or corruption raises naming the
    file. The TFRecord framing is parsed here over the file's bytes (one read) because a
    tf.data pipeline per file costs ~15 ms, more than a virtual client's whole file."""
    data = storage.read_bytes(path)
    pos, n = 0, len(data)
    while pos < n:
        if pos + 12 > n:
            raise _corrupt(path, "truncated record header")
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        if _masked_crc(data[pos:pos + 8]) != length_crc:
            raise _corrupt(path, f"length CRC mismatch at byte {pos}")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > n:
            raise _corrupt(path, "truncated record")
        record = data[start:end]
        if _masked_crc(record) != struct.unpack_from("<I", data, end)[0]:
            raise _corrupt(path, f"data CRC mismatch at byte {start}")
        yield record
        pos = end + 4


def _corrupt(path: str, what: str) -> storage.StorageError:
    return storage.StorageError(f"{path} is not valid TFRecord data ({what}): the file is "
                                "truncated or corrupt; fix or remove it and rerun")


def iter_records(files: Iterable[str]) -> Iterator[bytes]:
    """Serialized records of the files in order; a corrupt file raises naming the file."""
    for path in files:
        yield from read_file_records(path)


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

    For data that fits in memory (public pretraining, evaluation, one virtual client): files
    written by our importers and the partition step, already validated, so each image is decoded
    once here without the full validation; a malformed record still raises.
    """
    images, labels, users = [], [], []
    for rec in iter_records(files):
        image, label, user = schema.parse_fields(rec)
        images.append(to_spec(schema.decode_image(image), spec))
        labels.append(label)
        users.append(user)
        if limit is not None and len(labels) >= limit:
            break
    if not labels:
        return (np.zeros((0, spec.height, spec.width, spec.channels), np.uint8),
                np.zeros((0,), np.int64), np.zeros((0,), object))
    return np.stack(images), np.asarray(labels, np.int64), np.asarray(users, object)
