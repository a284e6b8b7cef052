"""Backbone -> L2-normalized embedding; a classification head kept apart (never aggregated).

Architectures:
- ``small_cnn`` (default): conv32-conv64-maxpool-dense, for 28x28 grey images, fast on CPU.
- ``mobilenet_v2_gn``: MobileNetV2 inverted-residual blocks with GroupNorm instead of BatchNorm.
  BatchNorm keeps running statistics computed from each client's batches: under federated
  averaging those statistics are neither aggregated meaningfully nor covered by the DP clip, and
  per-example DP bounds break when examples interact through batch statistics. GroupNorm
  normalizes within one example, has no state besides trainable weights, and so suits DP and FL.

Pixel scaling and augmentation live here (:func:`scale_pixels`, :func:`augment`) and are used by
pretraining, federated training and evaluation alike. A saved model directory holds a SavedModel
whose serving signature maps uint8 images to embeddings, ``weights.npz`` (to rebuild the Keras
backbone for further training) and ``model.json`` (its configuration).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from dpfedemb import storage
from dpfedemb.config import ImageSpec, ModelConfig, from_mapping
from dpfedemb.data.records import to_spec

MODEL_JSON = "model.json"
WEIGHTS = "weights.npz"


class ModelLoadError(storage.StorageError):
    """A model directory is missing, incomplete, or not ours."""


def scale_pixels(images: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; the one pixel scaling used everywhere."""
    return tf.cast(images, tf.float32) / 255.0


def augment(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random translation of up to 2 pixels (stateless, seeded by a shape-[2] int tensor)."""
    shape = tf.shape(images)
    padded = tf.pad(images, [[0, 0], [2, 2], [2, 2], [0, 0]])
    return tf.image.stateless_random_crop(padded, shape, seed=seed)


def _init(seed: int, i: int) -> dict[str, Any]:
    # Seeded initializers: TFF traces model construction, and unseeded initializers would take
    # their seed at trace time, making starts irreproducible.
    return {"kernel_initializer": tf.keras.initializers.GlorotUniform(seed=seed * 1000 + i)}


def _small_cnn(cfg: ModelConfig) -> tf.keras.Model:
    s = cfg.image
    inp = tf.keras.Input((s.height, s.width, s.channels), name="pixels")
    x = tf.keras.layers.Conv2D(32, 3, activation="relu", **_init(cfg.seed, 1))(inp)
    x = tf.keras.layers.Conv2D(64, 3, activation="relu", **_init(cfg.seed, 2))(x)
    x = tf.keras.layers.MaxPool2D(2)(x)
    x = tf.keras.layers.Flatten()(x)
    x = tf.keras.layers.Dense(cfg.embedding_dim, **_init(cfg.seed, 3))(x)
    out = tf.keras.layers.UnitNormalization(name="embedding")(x)
    return tf.keras.Model(inp, out, name="small_cnn")


def _gn(channels: int) -> tf.keras.layers.Layer:
    groups = max(g for g in (1, 2, 4, 8) if channels % g == 0)
    return tf.keras.layers.GroupNormalization(groups=groups)


def _mobilenet_v2_gn(cfg: ModelConfig) -> tf.keras.Model:
    """A compact MobileNetV2 (expansion 6, width 0.5) with GroupNorm."""
    s = cfg.image
    k = iter(range(1, 1000))
    inp = tf.keras.Input((s.height, s.width, s.channels), name="pixels")
    x = tf.keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False,
                               **_init(cfg.seed, next(k)))(inp)
    x = tf.keras.layers.ReLU(6.0)(_gn(16)(x))
    for out_ch, stride, repeats in ((8, 1, 1), (12, 2, 2), (16, 2, 3), (32, 2, 4), (48, 1, 3),
                                    (80, 2, 3), (160, 1, 1)):
        for r in range(repeats):
            inp_ch = x.shape[-1]
            y = tf.keras.layers.Conv2D(inp_ch * 6, 1, use_bias=False, **_init(cfg.seed, next(k)))(x)
            y = tf.keras.layers.ReLU(6.0)(_gn(inp_ch * 6)(y))
            y = tf.keras.layers.DepthwiseConv2D(3, strides=stride if r == 0 else 1, padding="same",
                                                use_bias=False)(y)
            y = tf.keras.layers.ReLU(6.0)(_gn(inp_ch * 6)(y))
            y = tf.keras.layers.Conv2D(out_ch, 1, use_bias=False, **_init(cfg.seed, next(k)))(y)
            y = _gn(out_ch)(y)
            x = tf.keras.layers.Add()([x, y]) if (r > 0 and inp_ch == out_ch) else y
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dense(cfg.embedding_dim, **_init(cfg.seed, next(k)))(x)
    out = tf.keras.layers.UnitNormalization(name="embedding")(x)
    return tf.keras.Model(inp, out, name="mobilenet_v2_gn")


def build_backbone(cfg: ModelConfig) -> tf.keras.Model:
    """Images scaled by :func:`scale_pixels` -> unit-norm embeddings [N, embedding_dim]."""
    return _small_cnn(cfg) if cfg.architecture == "small_cnn" else _mobilenet_v2_gn(cfg)


class CosineHead(tf.keras.layers.Layer):
    """Logits = scale * cos(embedding, class weight), with a learned scale."""

    def __init__(self, num_classes: int, seed: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.num_classes, self.seed = num_classes, seed

    def build(self, input_shape: tf.TensorShape) -> None:
        self.w = self.add_weight("w", (int(input_shape[-1]), self.num_classes),
                                 initializer=tf.keras.initializers.GlorotUniform(seed=self.seed))
        self.scale = self.add_weight("scale", (), initializer=tf.keras.initializers.Constant(10.0))

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return self.scale * tf.matmul(tf.math.l2_normalize(x, -1), tf.math.l2_normalize(self.w, 0))


def build_head(embedding_dim: int, num_classes: int, kind: str = "dense",
               seed: int = 0) -> tf.keras.Model:
    """Classification head on embeddings: bias-free dense (default) or cosine with learned scale."""
    if kind not in ("dense", "cosine"):
        raise ValueError(f"invalid head kind {kind!r}: use 'dense' or 'cosine'")
    inp = tf.keras.Input((embedding_dim,))
    if kind == "dense":
        layer = tf.keras.layers.Dense(num_classes, use_bias=False,
                                      kernel_initializer=tf.keras.initializers.GlorotUniform(seed))
    else:
        layer = CosineHead(num_classes, seed=seed)
    return tf.keras.Model(inp, layer(inp), name="head")


class _Serving(tf.Module):
    def __init__(self, backbone: tf.keras.Model, spec: ImageSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.serve = tf.function(
            lambda images: {"embeddings": backbone(scale_pixels(images), training=False)},
            input_signature=[tf.TensorSpec([None, spec.height, spec.width, spec.channels],
                                           tf.uint8, name="images")])


def save_backbone(backbone: tf.keras.Model, cfg: ModelConfig, path: str,
                  extra: Optional[dict] = None, json_files: Optional[dict[str, Any]] = None) -> None:
    """Write the model directory atomically: SavedModel (uint8 images -> embeddings),
    ``weights.npz``, ``model.json`` and any ``json_files`` (name -> JSON-ready object)."""
    stage = storage.staging_dir(path)
    try:
        module = _Serving(backbone, cfg.image)
        tf.saved_model.save(module, stage, signatures={"serving_default": module.serve})
        buf = io.BytesIO()
        np.savez(buf, *backbone.get_weights())
        storage.write_bytes_atomic(storage.join(stage, WEIGHTS), buf.getvalue())
        meta = {"model": dataclasses.asdict(cfg), "image": dataclasses.asdict(cfg.image),
                "embedding_dim": cfg.embedding_dim, "signature": "serving_default",
                "input": "uint8 images [N, H, W, C]", "output": "embeddings, L2-normalized"}
        meta.update(extra or {})
        storage.write_json_atomic(storage.join(stage, MODEL_JSON), meta)
        for name, obj in (json_files or {}).items():
            storage.write_json_atomic(storage.join(stage, name), obj)
        storage.publish_dir(stage, path)
    except BaseException:
        if storage.exists(stage):
            storage.remove_tree(stage)
        raise


def read_model_config(path: str) -> tuple[ModelConfig, dict]:
    """The ModelConfig and full metadata of a saved model directory (clear errors when bad)."""
    try:
        storage.require_complete(path, "model")
        meta = storage.read_json(storage.join(path, MODEL_JSON))
    except storage.StorageError as e:
        raise ModelLoadError(str(e)) from e
    m = dict(meta.get("model", {}))
    m["image"] = ImageSpec(**m.get("image", {}))
    return from_mapping(ModelConfig, m), meta


def load_backbone(path: str) -> tuple[tf.keras.Model, ModelConfig]:
    """Rebuild the Keras backbone of a saved model directory with its weights (for training)."""
    cfg, _ = read_model_config(path)
    backbone = build_backbone(cfg)
    try:
        data = np.load(io.BytesIO(storage.read_bytes(storage.join(path, WEIGHTS))))
        weights = [data[f"arr_{i}"] for i in range(len(data.files))]
        backbone.set_weights(weights)
    except (storage.StorageError, ValueError, OSError) as e:
        raise ModelLoadError(f"model at {path} has unreadable or mismatched weights ({e}); "
                             "re-run the step that wrote it") from e
    return backbone, cfg


@dataclasses.dataclass
class Embedder:
    """A loaded SavedModel: uint8 images of any size -> L2-normalized embeddings."""

    path: str
    image_spec: ImageSpec
    _fn: Any

    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        s = self.image_spec
        if images.shape[1:] != (s.height, s.width, s.channels):
            images = np.stack([to_spec(im, s) for im in images]) if len(images) else \
                np.zeros((0, s.height, s.width, s.channels), np.uint8)
        out = [self._fn(images=tf.constant(images[i:i + batch_size], tf.uint8))["embeddings"].numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_embedder(path: str) -> Embedder:
    """Load a saved model directory for inference."""
    cfg, _ = read_model_config(path)
    try:
        fn = tf.saved_model.load(path).signatures["serving_default"]
    except (OSError, ValueError, KeyError, tf.errors.OpError) as e:
        raise ModelLoadError(f"model at {path} is not a loadable SavedModel ({e})") from e
    return Embedder(path=path, image_spec=cfg.image, _fn=fn)

