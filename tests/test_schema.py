"""Record schema: round trips and validation reasons."""
import numpy as np
import pytest
from tensorflow.core.example import example_pb2

from dpfedemb.data import schema


def test_png_round_trip_grey_and_rgb():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    assert np.array_equal(schema.decode_image(schema.encode_image(grey))[..., 0], grey)
    assert np.array_equal(schema.decode_image(schema.encode_image(rgb)), rgb)


def test_example_round_trip():
    img = schema.encode_image(np.zeros((28, 28), np.uint8))
    rec = schema.parse_record(schema.make_example(img, 7, b"alice"))
    assert (rec.label, rec.user_id, rec.height, rec.width, rec.channels) == (7, b"alice", 28, 28, 1)
    assert rec.image == img


def test_jpeg_accepted():
    img = schema.encode_image(np.full((16, 16, 3), 99, np.uint8), fmt="JPEG")
    assert schema.parse_record(schema.make_example(img, 0, b"u")).channels == 3


def test_encode_rejects_wrong_dtype():
    with pytest.raises(ValueError, match="uint8"):
        schema.encode_image(np.zeros((4, 4), np.float32))


def _raw(image=None, label=None, user=None, float_label=None):
    ex = example_pb2.Example()
    if image is not None:
        ex.features.feature["image"].bytes_list.value.append(image)
    if label is not None:
        ex.features.feature["label"].int64_list.value.extend(label)
    if float_label is not None:
        ex.features.feature["label"].float_list.value.append(float_label)
    if user is not None:
        ex.features.feature["user_id"].bytes_list.value.append(user)
    return ex.SerializeToString()


GOOD = schema.encode_image(np.zeros((28, 28), np.uint8))


@pytest.mark.parametrize("record,reason", [
    (b"\xff\x00garbage", schema.NOT_AN_EXAMPLE),
    (_raw(label=[1], user=b"u"), schema.MISSING_IMAGE),
    (_raw(image=b"", label=[1], user=b"u"), schema.EMPTY_IMAGE),
    (_raw(image=b"not an image", label=[1], user=b"u"), schema.UNDECODABLE_IMAGE),
    (_raw(image=GOOD[:40], label=[1], user=b"u"), schema.UNDECODABLE_IMAGE),
    (_raw(image=GOOD, user=b"u"), schema.MISSING_LABEL),
    (_raw(image=GOOD, float_label=1.5, user=b"u"), schema.LABEL_NOT_INT64),
    (_raw(image=GOOD, label=[1, 2], user=b"u"), schema.MULTIPLE_LABELS),
    (_raw(image=GOOD, label=[-3], user=b"u"), schema.NEGATIVE_LABEL),
    (_raw(image=GOOD, label=[1]), schema.MISSING_USER_ID),
    (_raw(image=GOOD, label=[1], user=b""), schema.EMPTY_USER_ID),
    (_raw(image=GOOD, label=[1], user=b"x" * 257), schema.USER_ID_TOO_LONG),
])
def test_invalid_records_have_their_reason(record, reason):
    with pytest.raises(schema.InvalidRecord) as e:
        schema.parse_record(record)
    assert e.value.reason == reason


def test_channel_and_size_limits():
    rgba = schema.encode_image(np.zeros((8, 8, 3), np.uint8))
    from PIL import Image
    import io
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(buf, format="PNG")
    with pytest.raises(schema.InvalidRecord) as e:
        schema.parse_record(schema.make_example(buf.getvalue(), 0, b"u"))
    assert e.value.reason == schema.BAD_CHANNELS
    with pytest.raises(schema.InvalidRecord) as e:
        schema.parse_record(schema.make_example(rgba, 0, b"u"), max_image_side=4)
    assert e.value.reason == schema.OVERSIZE_IMAGE
