"""The DP-FedEmb learning process on TensorFlow Federated.

DP-FedEmb (Xu et al., CVPR 2023): only the backbone is broadcast and aggregated (partial
aggregation). Each sampled virtual client builds a fresh classification head over its own classes
(labels remapped to local ids; the head is never sent or stored), starts it at the client's
class-mean embeddings (``head_init='prototype'``), trains the head alone for
``reconstruction_steps`` batches, then backbone and head together (head learning rate = client
learning rate x ``head_lr_scale``), and returns only its backbone delta. A delta with a non-finite
value is replaced by zeros and counted. The server clips each delta to L2 norm C, sums, adds
Gaussian noise (TFF's ``DifferentiallyPrivateFactory``: fixed, adaptive clipping, or tree
aggregation), divides by the expected number of clients and applies SGD with momentum.

``algorithm='dp_fedavg'`` is the baseline the paper compares with: the full model (backbone and
one global head over all classes) is aggregated and noised.

The client work is written by hand on TFF's templates (``ClientWorkProcess`` composed with
``compose_learning_process``) because TFF's ``build_fed_recon`` freezes the local head after
reconstruction and has no head learning-rate scale, which DP-FedEmb needs.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dpfedemb import model as model_lib
from dpfedemb.config import ModelConfig, PrivacyConfig, TrainConfig


# Logit scale of an imprinted dense head: logits = 10 x cosine(embedding, class mean).
PROTOTYPE_LOGIT_SCALE = 10.0


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """What the learning process is built from."""

    model: ModelConfig
    train: TrainConfig
    privacy: PrivacyConfig
    head_classes: int

    @property
    def element_spec(self) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        s = self.model.image
        return (tf.TensorSpec([None, s.height, s.width, s.channels], tf.uint8),
                tf.TensorSpec([None], tf.int32))


def split_variables(backbone: tf.keras.Model, head: tf.keras.Model | None, train_last_layers: int
                    ) -> tuple[list[tf.Variable], list[tf.Variable]]:
    """(aggregated, frozen) variables: the backbone's last layers (all when 0), plus the head."""
    layers = [l for l in backbone.layers if l.weights]
    train_layers = layers if train_last_layers == 0 else layers[-train_last_layers:]
    train_ids = {id(v) for l in train_layers for v in l.weights}
    trainable = [v for v in backbone.weights if id(v) in train_ids]
    frozen = [v for v in backbone.weights if id(v) not in train_ids]
    if head is not None:
        trainable += list(head.weights)
    return trainable, frozen


def _global_head(spec: ProcessSpec) -> bool:
    return spec.train.algorithm == "dp_fedavg"


def _build_models(spec: ProcessSpec) -> tuple[tf.keras.Model, tf.keras.Model]:
    backbone = model_lib.build_backbone(spec.model)
    head = model_lib.build_head(spec.model.embedding_dim, spec.head_classes, spec.train.head,
                                seed=spec.model.seed)
    return backbone, head


def initial_weights_fn(spec: ProcessSpec) -> tff.Computation:
    @tff.tensorflow.computation
    def init() -> tff.learning.models.ModelWeights:
        backbone, head = _build_models(spec)
        trainable, frozen = split_variables(backbone, head if _global_head(spec) else None,
                                            spec.train.train_last_layers)
        return tff.learning.models.ModelWeights(trainable=[tf.identity(v) for v in trainable],
                                                non_trainable=[tf.identity(v) for v in frozen])
    return init


def _client_update_fn(spec: ProcessSpec) -> Callable[..., Any]:
    """The TF function one virtual client runs (traced inside a TFF computation)."""
    t = spec.train
    head_lr = t.client_learning_rate * t.head_lr_scale

    def update(initial: tff.learning.models.ModelWeights, dataset: tf.data.Dataset) -> Any:
        # Models are built here, outside the tf.function below: the function then gets
        # automatic control dependencies, so reads of the trained variables happen after training.
        backbone, head = _build_models(spec)
        glob = _global_head(spec)
        trainable, frozen = split_variables(backbone, head if glob else None, t.train_last_layers)
        bb_vars = trainable[:len(trainable) - (len(head.weights) if glob else 0)]
        head_vars = list(head.trainable_weights)
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def batch_loss(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            return loss_fn(y, head(backbone(model_lib.scale_pixels(x), training=True),
                                   training=True))

        def head_step(acc: tf.Tensor, batch: Any) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = batch_loss(*batch)
            for v, g in zip(head_vars, tape.gradient(loss, head_vars)):
                v.assign_sub(head_lr * g)
            return acc + loss

        def joint_step(acc: Any, batch: Any) -> Any:
            x, y = batch
            with tf.GradientTape() as tape:
                loss = batch_loss(x, y)
            grads = tape.gradient(loss, bb_vars + head_vars)
            for v, g in zip(bb_vars, grads[:len(bb_vars)]):
                v.assign_sub(t.client_learning_rate * g)
            for v, g in zip(head_vars, grads[len(bb_vars):]):
                v.assign_sub(head_lr * g)
            return acc[0] + loss, acc[1] + 1.0, acc[2] + tf.cast(tf.shape(y)[0], tf.float32)

        def imprint(dataset: tf.data.Dataset) -> None:
            """Start the fresh local head at the client's normalized class means ("weight
            imprinting"): a head that already fits before the backbone sees its gradients, so
            the first joint steps do not pull embeddings towards a random head."""
            def add(acc: Any, batch: Any) -> Any:
                x, y = batch
                e = backbone(model_lib.scale_pixels(x), training=False)
                return acc + tf.math.unsorted_segment_sum(e, y, spec.head_classes)
            sums = dataset.reduce(tf.zeros([spec.head_classes, spec.model.embedding_dim]), add)
            protos = tf.transpose(tf.math.l2_normalize(sums, axis=1))  # absent classes stay 0
            scale = PROTOTYPE_LOGIT_SCALE if spec.train.head == "dense" else 1.0
            head_vars[0].assign(scale * protos)

        @tf.function
        def run(initial: Any, dataset: tf.data.Dataset) -> Any:
            for v, w in zip(trainable, initial.trainable):
                v.assign(w)
            for v, w in zip(frozen, initial.non_trainable):
                v.assign(w)
            if not glob and t.head_init == "prototype":
                imprint(dataset)
            if not glob and t.reconstruction_steps > 0:
                # repeat(): small clients still get all their head-only steps.
                dataset.repeat().take(t.reconstruction_steps).reduce(tf.constant(0.0), head_step)
            loss_sum, batches, examples = dataset.repeat(t.local_epochs).reduce(
                (tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)), joint_step)
            delta = [w - v for w, v in zip(initial.trainable, trainable)]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in delta])
            delta = [tf.where(finite, d, tf.zeros_like(d)) for d in delta]
            norm = tf.linalg.global_norm(delta)
            out = collections.OrderedDict(
                loss=tf.math.divide_no_nan(loss_sum, batches), examples=examples,
                nonfinite=1.0 - tf.cast(finite, tf.float32),
                clipped=tf.cast(norm > spec.privacy.clip_norm, tf.float32), norm=norm)
            return delta, out

        delta, out = run(initial, dataset)
        return tff.learning.templates.ClientResult(update=delta, update_weight=1.0), out
    return update


def build_client_work(spec: ProcessSpec, weights_type: tff.Type) -> tff.learning.templates.ClientWorkProcess:
    """ClientWorkProcess: local head reconstruction + joint training; backbone delta out."""
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(spec.element_spec))
    client_update = tff.tensorflow.computation(_client_update_fn(spec), weights_type, data_type)

    @tff.federated_computation
    def init_fn() -> Any:
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(init_fn.type_signature.result,
                               tff.FederatedType(weights_type, tff.CLIENTS),
                               tff.FederatedType(data_type, tff.CLIENTS))
    def next_fn(state: Any, weights: Any, data: Any) -> Any:
        result, out = tff.federated_map(client_update, (weights, data))
        # Non-private diagnostics (not covered by epsilon; for operators, not for publication).
        measurements = tff.federated_zip(collections.OrderedDict(
            loss=tff.federated_mean(out.loss), examples=tff.federated_sum(out.examples),
            nonfinite_updates=tff.federated_sum(out.nonfinite),
            fraction_clipped=tff.federated_mean(out.clipped),
            mean_update_norm=tff.federated_mean(out.norm),
            clients=tff.federated_sum(tff.federated_value(1, tff.CLIENTS))))
        return tff.templates.MeasuredProcessOutput(state, result, measurements)

    return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def dp_factory(spec: ProcessSpec, update_specs: Sequence[tf.TensorSpec]
               ) -> tff.aggregators.UnweightedAggregationFactory:
    """TFF's DP aggregator for the configured mechanism (TFF draws the noise, unseeded)."""
    p = spec.privacy
    f = tff.aggregators.DifferentiallyPrivateFactory
    if p.mechanism == "gaussian_fixed":
        return f.gaussian_fixed(p.noise_multiplier, p.clients_per_round, p.clip_norm)
    if p.mechanism == "gaussian_adaptive":
        return f.gaussian_adaptive(p.noise_multiplier, p.clients_per_round,
                                   initial_l2_norm_clip=p.clip_norm,
                                   target_unclipped_quantile=p.target_unclipped_quantile)
    # Tree aggregation keeps its noise seeds in the aggregator state: checkpoints are secrets.
    return f.tree_aggregation(p.noise_multiplier, p.clients_per_round, p.clip_norm,
                              record_specs=list(update_specs))


def build_process(spec: ProcessSpec) -> tff.learning.templates.LearningProcess:
    """The composed learning process: broadcast -> client work -> DP sum -> server SGDM."""
    init = initial_weights_fn(spec)
    weights_type = init.type_signature.result
    update_type = weights_type.trainable
    update_specs = [tf.TensorSpec(t.shape, t.dtype) for t in update_type]
    aggregator = tff.aggregators.as_weighted_aggregator(dp_factory(spec, update_specs)).create(
        update_type, tff.TensorType(np.float32))
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
        tff.learning.optimizers.build_sgdm(spec.train.server_learning_rate,
                                           momentum=spec.train.server_momentum or None),
        weights_type)
    return tff.learning.templates.compose_learning_process(
        init, tff.learning.templates.build_broadcast_process(weights_type),
        build_client_work(spec, weights_type), aggregator, finalizer)


def weights_of(backbone: tf.keras.Model, spec: ProcessSpec, head: tf.keras.Model | None = None
               ) -> tff.learning.models.ModelWeights:
    """ModelWeights (numpy) of a Keras backbone (+ global head) in the process's layout."""
    if _global_head(spec) and head is None:
        head = model_lib.build_head(spec.model.embedding_dim, spec.head_classes, spec.train.head,
                                    seed=spec.model.seed)
    trainable, frozen = split_variables(backbone, head if _global_head(spec) else None,
                                        spec.train.train_last_layers)
    return tff.learning.models.ModelWeights(trainable=[v.numpy() for v in trainable],
                                            non_trainable=[v.numpy() for v in frozen])


def assign_backbone(backbone: tf.keras.Model, weights: Any, spec: ProcessSpec) -> None:
    """Write the process's model weights back into a Keras backbone (the head is dropped)."""
    trainable, frozen = split_variables(backbone, None, spec.train.train_last_layers)
    for v, w in zip(trainable, list(weights.trainable)[:len(trainable)]):
        v.assign(w)
    for v, w in zip(frozen, weights.non_trainable):
        v.assign(w)
