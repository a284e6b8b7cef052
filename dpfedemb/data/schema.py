"""The record schema: one ``tf.train.Example`` per image, owned here (encode, decode, validate).

Features: ``image`` (encoded PNG or JPEG bytes), ``label`` (int64 >= 0, a global class id) and
``user_id`` (bytes, the data owner; replaced by a keyed pseudonym during partitioning).
Validation returns a reason code instead of raising, so Beam can route bad records to dead letters.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Optional

import numpy as np
from PIL import Image
from tensorflow.core.example import example_pb2, feature_pb2

IMAGE, LABEL, USER_ID = "image", "label", "user_id"

# Reason codes for records that fail validation (each one a distinct, documented failure).
NOT_AN_EXAMPLE = "not_an_example"            # bytes are not a tf.train.Example proto
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE = "empty_image"
UNDECODABLE_IMAGE = "undecodable_image"      # not PNG/JPEG, or corrupt
BAD_CHANNELS = "bad_channels"                # channel count not allowed
OVERSIZE_IMAGE = "oversize_image"            # a side above the configured limit
MISSING_LABEL = "missing_label"
LABEL_NOT_INT64 = "label_not_int64"          # e.g. a float or bytes label
MULTIPLE_LABELS = "multiple_labels"
NEGATIVE_LABEL = "negative_label"
MISSING_USER_ID = "missing_user_id"
EMPTY_USER_ID = "empty_user_id"
USER_ID_TOO_LONG = "user_id_too_long"
USER_ID_NOT_BYTES = "user_id_not_bytes"      # e.g. an int64 user id
REASONS = (NOT_AN_EXAMPLE, MISSING_IMAGE, EMPTY_IMAGE, UNDECODABLE_IMAGE, BAD_CHANNELS,
           OVERSIZE_IMAGE, MISSING_LABEL, LABEL_NOT_INT64, MULTIPLE_LABELS, NEGATIVE_LABEL,
           MISSING_USER_ID, EMPTY_USER_ID, USER_ID_TOO_LONG, USER_ID_NOT_BYTES)

_MODE_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "P": 3, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4,
                  "YCbCr": 3}


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated record: encoded image, its decoded geometry, label and user id."""

    image: bytes
    label: int
    user_id: bytes
    height: int
    width: int
    channels: int


class InvalidRecord(ValueError):
    """A record failed validation; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def encode_image(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode a uint8 array (H, W), (H, W, 1) or (H, W, 3) as PNG (default) or JPEG bytes."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"image dtype is {pixels.dtype}; expected uint8 in [0, 255] "
                         "(convert with np.clip(x, 0, 255).astype(np.uint8))")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
        raise ValueError(f"image shape {pixels.shape} is not (H, W), (H, W, 1) or (H, W, 3)")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def decode_image(data: bytes, channels: Optional[int] = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 (H, W, C); ``channels`` converts to 1 or 3 when given."""
    with Image.open(io.BytesIO(data)) as img:
        if channels == 1:
            img = img.convert("L")
        elif channels == 3:
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def make_example(image: bytes, label: int, user_id: bytes) -> bytes:
    """Serialize one record."""
    ex = example_pb2.Example()
    ex.features.feature[IMAGE].bytes_list.value.append(image)
    ex.features.feature[LABEL].int64_list.value.append(int(label))
    ex.features.feature[USER_ID].bytes_list.value.append(user_id)
    return ex.SerializeToString()


def _feature(ex: example_pb2.Example, name: str) -> Optional[feature_pb2.Feature]:
    if name not in ex.features.feature:
        return None
    f = ex.features.feature[name]
    return None if f.WhichOneof("kind") is None else f


def _image_geometry(data: bytes) -> tuple[int, int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise InvalidRecord(UNDECODABLE_IMAGE, f"format {img.format}, expected PNG or JPEG")
            img.load()  # decodes fully: catches truncated data, not just a good header
            return img.height, img.width, _MODE_CHANNELS.get(img.mode, 0)
    except InvalidRecord:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise InvalidRecord(UNDECODABLE_IMAGE, type(e).__name__) from None


def parse_fields(serialized: bytes) -> tuple[bytes, int, bytes]:
    """(image bytes, label, user id) of a record already validated by :func:`parse_record`."""
    f = example_pb2.Example.FromString(serialized).features.feature
    try:
        return (f[IMAGE].bytes_list.value[0], int(f[LABEL].int64_list.value[0]),
                f[USER_ID].bytes_list.value[0])
    except IndexError:
        raise InvalidRecord(NOT_AN_EXAMPLE, "record lacks image, label or user_id") from None


def parse_record(serialized: bytes, *, max_image_side: int = 1024,
                 allowed_channels: tuple[int, ...] = (1, 3),
                 max_user_id_bytes: int = 256) -> Record:
    """Parse and validate one serialized record; raise :class:`InvalidRecord` with a reason code."""
    try:
        ex = example_pb2.Example.FromString(serialized)
    except Exception:
        raise InvalidRecord(NOT_AN_EXAMPLE) from None
    img_f = _feature(ex, IMAGE)
    if img_f is None or img_f.WhichOneof("kind") != "bytes_list" or not img_f.bytes_list.value:
        raise InvalidRecord(MISSING_IMAGE)
    image = img_f.bytes_list.value[0]
    if not image:
        raise InvalidRecord(EMPTY_IMAGE)
    label_f = _feature(ex, LABEL)
    if label_f is None:
        raise InvalidRecord(MISSING_LABEL)
    if label_f.WhichOneof("kind") != "int64_list":
        raise InvalidRecord(LABEL_NOT_INT64, label_f.WhichOneof("kind"))
    if len(label_f.int64_list.value) != 1:
        raise InvalidRecord(MULTIPLE_LABELS if label_f.int64_list.value else MISSING_LABEL)
    label = int(label_f.int64_list.value[0])
    if label < 0:
        raise InvalidRecord(NEGATIVE_LABEL, str(label))
    uid_f = _feature(ex, USER_ID)
    if uid_f is None:
        raise InvalidRecord(MISSING_USER_ID)
    if uid_f.WhichOneof("kind") != "bytes_list":
        raise InvalidRecord(USER_ID_NOT_BYTES, uid_f.WhichOneof("kind"))
    if not uid_f.bytes_list.value or not uid_f.bytes_list.value[0]:
        raise InvalidRecord(EMPTY_USER_ID)
    user_id = uid_f.bytes_list.value[0]
    if len(user_id) > max_user_id_bytes:
        raise InvalidRecord(USER_ID_TOO_LONG, f"{len(user_id)} > {max_user_id_bytes} bytes")
    h, w, c = _image_geometry(image)
    if c not in allowed_channels:
        raise InvalidRecord(BAD_CHANNELS, f"{c} not in {allowed_channels}")
    if max(h, w) > max_image_side:
        raise InvalidRecord(OVERSIZE_IMAGE, f"{h}x{w} > {max_image_side}")
    return Record(image=image, label=label, user_id=user_id, height=h, width=w, channels=c)
