"""Centralized, non-private training of the backbone with a softmax head.

Used for public pretraining (the pipeline's second step) and, on the private split, as the
non-private centralized utility reference of the benchmarks: the same code path for both.
CLI: ``python -m dpfedemb.pretrain --data GLOB --output MODEL_DIR [--init MODEL_DIR] ...``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from dpfedemb import model as model_lib
from dpfedemb import storage
from dpfedemb.config import ConfigError, ImageSpec, ModelConfig, PretrainConfig, as_dict
from dpfedemb.data import records

log = logging.getLogger("dpfedemb.pretrain")


class _Progress(tf.keras.callbacks.Callback):
    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs, self.t0 = epochs, time.time()

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        logs = logs or {}
        done = epoch + 1
        eta = (time.time() - self.t0) / done * (self.epochs - done)
        log.info("epoch %d/%d loss %.4f accuracy %.4f eta %.0fs", done, self.epochs,
                 logs.get("loss", float("nan")), logs.get("accuracy", float("nan")), eta)


def train_centralized(images: np.ndarray, labels: np.ndarray, model_cfg: ModelConfig,
                      cfg: PretrainConfig, backbone: Optional[tf.keras.Model] = None
                      ) -> tuple[tf.keras.Model, dict]:
    """Train backbone + softmax head over the given classes; return the backbone and metrics."""
    if len(images) == 0:
        raise ConfigError("the training data is empty: check --data")
    classes, y = np.unique(labels, return_inverse=True)
    backbone = backbone or model_lib.build_backbone(model_cfg)
    head = model_lib.build_head(model_cfg.embedding_dim, len(classes), seed=cfg.seed)
    inp = tf.keras.Input(images.shape[1:], dtype=tf.uint8)
    x = model_lib.scale_pixels(inp)
    full = tf.keras.Model(inp, head(backbone(x)))
    opt = (tf.keras.optimizers.Adam(cfg.learning_rate) if cfg.optimizer == "adam"
           else tf.keras.optimizers.SGD(cfg.learning_rate, momentum=0.9))
    full.compile(opt, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"])
    ds = tf.data.Dataset.from_tensor_slices((images, y.astype(np.int64)))
    ds = ds.shuffle(len(images), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    if cfg.augment:
        ds = ds.map(lambda a, b: (tf.cast(model_lib.augment(a, tf.constant([cfg.seed, 7])), tf.uint8), b))
    tf.keras.utils.set_random_seed(cfg.seed)
    t0 = time.time()
    hist = full.fit(ds.prefetch(2), epochs=cfg.epochs, verbose=0, callbacks=[_Progress(cfg.epochs)])
    seconds = time.time() - t0
    h = hist.history
    metrics = {"epochs": cfg.epochs, "examples": int(len(images)), "classes": int(len(classes)),
               "loss": [float(v) for v in h.get("loss", [])],
               "accuracy": [float(v) for v in h.get("accuracy", [])],
               "seconds": seconds,
               "examples_per_second": cfg.epochs * len(images) / seconds if seconds else None}
    return backbone, metrics


def spec_from_card(card_path: Optional[str], fallback: ImageSpec) -> ImageSpec:
    """The image spec of a data set card (``image`` key), or ``fallback``."""
    if not card_path:
        return fallback
    return ImageSpec(**storage.read_json(card_path)["image"])


def run_pretrain(data_glob: str, output: str, model_cfg: ModelConfig, cfg: PretrainConfig,
                 init: Optional[str] = None, limit: Optional[int] = None) -> dict:
    """Load the data, train, and save the backbone with its metrics; returns the metrics."""
    files = records.files_of(data_glob)
    backbone = None
    if init:
        backbone, model_cfg = model_lib.load_backbone(init)
    images, labels, _ = records.load_arrays(files, model_cfg.image, limit=limit)
    log.info("pretraining %s on %d examples, %d classes", model_cfg.architecture, len(images),
             len(np.unique(labels)))
    backbone, metrics = train_centralized(images, labels, model_cfg, cfg, backbone)
    metrics.update({"data": data_glob, "data_sha256": records.fingerprint(files),
                    "params": as_dict(cfg), "model": as_dict(model_cfg), "init": init,
                    "private": False})
    model_lib.save_backbone(backbone, model_cfg, output, extra={"trained_by": "pretrain"},
                            json_files={"metrics.json": metrics})
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpfedemb.pretrain", description=__doc__)
    p.add_argument("--data", required=True, help="TFRecord glob of the (public) training split")
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument("--card", default=None, help="dataset card.json (gives the image shape)")
    p.add_argument("--init", default=None, help="start from this saved model instead of random")
    p.add_argument("--architecture", default="small_cnn")
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--augment", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="use at most this many examples")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    a = build_parser().parse_args(argv)
    try:
        spec = spec_from_card(a.card, ImageSpec())
        model_cfg = ModelConfig(architecture=a.architecture, embedding_dim=a.embedding_dim,
                                image=spec, seed=a.seed)
        cfg = PretrainConfig(epochs=a.epochs, batch_size=a.batch_size,
                             learning_rate=a.learning_rate, optimizer=a.optimizer,
                             augment=a.augment, seed=a.seed)
        metrics = run_pretrain(a.data, a.output, model_cfg, cfg, init=a.init, limit=a.limit)
    except (ConfigError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": a.output, "loss": metrics["loss"][-1:] or None,
                      "accuracy": metrics["accuracy"][-1:] or None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
