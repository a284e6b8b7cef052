"""Backbone, head, saving/loading and pretraining."""
import os

import numpy as np
import pytest
import tensorflow as tf

from dpfedemb import model as model_lib
from dpfedemb import storage
from dpfedemb.config import ImageSpec, ModelConfig, PretrainConfig
from dpfedemb.pretrain import train_centralized


def test_embedding_shape_and_unit_norm():
    cfg = ModelConfig(embedding_dim=16)
    e = model_lib.build_backbone(cfg)(np.random.rand(5, 28, 28, 1).astype(np.float32)).numpy()
    assert e.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)


def test_mobilenet_gn_rgb_has_no_batchnorm():
    cfg = ModelConfig(architecture="mobilenet_v2_gn", embedding_dim=32, image=ImageSpec(32, 32, 3))
    bb = model_lib.build_backbone(cfg)
    assert bb(np.random.rand(2, 32, 32, 3).astype(np.float32)).shape == (2, 32)
    assert not [l for l in bb.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert not bb.non_trainable_weights  # nothing outside the gradient (and the DP clip)


def test_seeded_construction_is_reproducible():
    a = model_lib.build_backbone(ModelConfig(seed=3)).get_weights()
    b = model_lib.build_backbone(ModelConfig(seed=3)).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["dense", "cosine"])
def test_heads(kind):
    head = model_lib.build_head(8, 4, kind=kind)
    assert head(np.random.rand(3, 8).astype(np.float32)).shape == (3, 4)
    if kind == "dense":
        assert len(head.trainable_weights) == 1  # bias-free


def test_save_load_round_trip_and_resize(tmp_path):
    cfg = ModelConfig(embedding_dim=8, seed=1)
    bb = model_lib.build_backbone(cfg)
    path = str(tmp_path / "m")
    model_lib.save_backbone(bb, cfg, path)
    imgs = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    direct = bb(model_lib.scale_pixels(imgs)).numpy()
    emb = model_lib.load_embedder(path)
    np.testing.assert_allclose(emb.embed(imgs), direct, atol=1e-6)
    rebuilt, cfg2 = model_lib.load_backbone(path)
    assert cfg2 == cfg
    np.testing.assert_allclose(rebuilt(model_lib.scale_pixels(imgs)).numpy(), direct, atol=1e-6)
    bigger = np.random.default_rng(1).integers(0, 256, (3, 40, 36, 3), dtype=np.uint8)
    assert emb.embed(bigger).shape == (3, 8)  # resized and converted, not rejected


def test_missing_and_corrupt_model_paths(tmp_path):
    with pytest.raises(model_lib.ModelLoadError, match="not found"):
        model_lib.load_embedder(str(tmp_path / "nothing"))
    cfg = ModelConfig(embedding_dim=8)
    path = str(tmp_path / "m")
    model_lib.save_backbone(model_lib.build_backbone(cfg), cfg, path)
    os.remove(os.path.join(path, storage.COMPLETE_MARKER))
    with pytest.raises(model_lib.ModelLoadError, match="incomplete"):
        model_lib.load_backbone(path)
    storage.write_bytes_atomic(os.path.join(path, storage.COMPLETE_MARKER), b"ok")
    with open(os.path.join(path, "weights.npz"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(model_lib.ModelLoadError, match="weights"):
        model_lib.load_backbone(path)


def test_pretraining_lowers_the_loss(tiny_images):
    x, y = tiny_images
    _, metrics = train_centralized(x[..., None], y, ModelConfig(embedding_dim=16),
                                   PretrainConfig(epochs=4, batch_size=32, learning_rate=3e-3))
    assert metrics["loss"][-1] < metrics["loss"][0] * 0.8
    assert metrics["examples"] == len(y) and metrics["classes"] == 6
