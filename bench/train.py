"""Training throughput (issue #5): client examples/s of DP-FedEmb rounds, side by side with
centralized Keras training of the same model on the same examples (the limit) and with TFF's stock
DP FedAvg on the same clients.

``python -m bench.train [--clients 32] [--examples-per-client 64] [--batch-size 32] [--rounds 6]
[--diagnostics] [--profile 15]``

Generated 28x28 grey images (class prototypes plus noise; each client holds a few of the global
classes), held in memory as per-client (x uint8 NHWC, y int32) arrays: the format
:meth:`dpfedemb.clients.ClientStore.dataset` produces. Every round each method gets the same
clients (all of them by default), each client's examples in a fresh random order, batched:

- ``centralized``: backbone + softmax head over the global classes, ``model.fit`` for one epoch of
  all clients' examples (same batch size, plain SGD at the client learning rate).
- ``dp_fedemb``: ``process.next`` of :func:`dpfedemb.federated.build_process` (local heads over
  local labels, ``reconstruction_steps`` head-only batches, then one joint epoch; the backbone
  delta is clipped, noised and averaged by TFF's Gaussian DP aggregator).
- ``stock_dp_fedavg``: ``tff.learning.algorithms.build_unweighted_fed_avg`` over
  ``tff.learning.models.from_keras_model`` (backbone + global head) with
  ``model_aggregator=DifferentiallyPrivateFactory.gaussian_fixed`` (same noise multiplier, clip,
  clients per round), client SGD at the same learning rate, server SGD with the same momentum.

``--diagnostics`` adds three variants that locate DP-FedEmb's cost: ``dp_fedemb_no_recon``
(reconstruction_steps=0), ``dp_fedavg_ours`` (this package's process with ``algorithm=dp_fedavg``:
global head, same hand-written client loop), and ``dp_fedemb_client_loop_no_tff`` (DP-FedEmb's
client update function run for every client in plain TensorFlow, without TFF's executor).

Round 1 of every method (tracing, compilation, worker start) is not timed; rounds 2..N are. The
methods take turns round by round (the order rotates), so machine noise hits all of them alike.
Examples/s counts the examples of the joint (full-model) pass only: DP-FedEmb's reconstruction
batches are extra work not counted. CPU seconds of this process and of TFF's ``worker_binary``
are recorded per method. ``--profile N`` runs one more round of the TFF methods under cProfile
(Python side only: the TensorFlow work runs in ``worker_binary``). Results:
``bench/results/train.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_federated as tff  # noqa: E402

from bench import common  # noqa: E402
from dpfedemb import federated  # noqa: E402
from dpfedemb import model as model_lib  # noqa: E402
from dpfedemb.config import ModelConfig, PrivacyConfig, TrainConfig, as_dict  # noqa: E402
from dpfedemb.train import stop_tff_workers  # noqa: E402

REQUIRED = ("centralized", "dp_fedemb", "stock_dp_fedavg")
DIAGNOSTIC = ("dp_fedemb_no_recon", "dp_fedavg_ours", "dp_fedemb_client_loop_no_tff")


def make_clients(n: int, per_client: int, classes: int, classes_per_client: int, seed: int
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-client (x uint8 [m, 28, 28, 1], y int32 global labels): prototypes plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 200, (classes, 28, 28, 1))
    out = []
    for _ in range(n):
        mine = rng.choice(classes, min(classes_per_client, classes), replace=False)
        y = rng.choice(mine, per_client).astype(np.int32)
        x = np.clip(protos[y] + rng.integers(-40, 40, (per_client, 28, 28, 1)), 0, 255)
        out.append((x.astype(np.uint8), y))
    return out


def local_labels(y: np.ndarray) -> np.ndarray:
    """Labels remapped to 0..n-1 within the client (as ClientStore does for DP-FedEmb)."""
    return np.unique(y, return_inverse=True)[1].astype(np.int32)


def keras_classifier(cfg: ModelConfig, classes: int) -> tf.keras.Model:
    """uint8 images -> scale_pixels -> backbone -> dense softmax head (logits)."""
    s = cfg.image
    inp = tf.keras.Input((s.height, s.width, s.channels), dtype=tf.uint8)
    x = tf.keras.layers.Lambda(model_lib.scale_pixels)(inp)
    x = model_lib.build_backbone(cfg)(x)
    out = model_lib.build_head(cfg.embedding_dim, classes, "dense", seed=cfg.seed)(x)
    return tf.keras.Model(inp, out)


class _CpuMeter:
    """CPU seconds (user + system) of this process and of TFF's worker_binary children."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self._workers: dict[int, psutil.Process] = {}

    def _worker_seconds(self) -> float:
        for c in self.me.children(recursive=True):
            if c.pid not in self._workers:
                try:
                    if "worker_binary" in " ".join(c.cmdline()):
                        self._workers[c.pid] = c
                except psutil.Error:
                    pass
        total = 0.0
        for p in self._workers.values():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def read(self) -> tuple[float, float]:
        t = self.me.cpu_times()
        return t.user + t.system, self._worker_seconds()


class Method:
    """One way of training on the same clients; ``step`` runs one round (or epoch)."""

    name: str = ""

    def step(self, data: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator) -> float:
        raise NotImplementedError

    @staticmethod
    def datasets(data: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                 batch: int, local: bool) -> list[tf.data.Dataset]:
        out = []
        for x, y in data:
            order = rng.permutation(len(y))
            yy = local_labels(y) if local else y
            out.append(tf.data.Dataset.from_tensor_slices((x[order], yy[order])).batch(batch))
        return out


class TffMethod(Method):
    def __init__(self, name: str, process: tff.learning.templates.LearningProcess, batch: int,
                 local: bool, examples_of: Callable[[Any], float]) -> None:
        self.name, self.process, self.batch, self.local = name, process, batch, local
        self.examples_of = examples_of
        self.state = process.initialize()

    def step(self, data, rng):
        out = self.process.next(self.state, self.datasets(data, rng, self.batch, self.local))
        self.state = out.state
        return float(self.examples_of(out.metrics))


class Centralized(Method):
    name = "centralized"

    def __init__(self, cfg: ModelConfig, classes: int, batch: int, lr: float) -> None:
        self.batch = batch
        self.model = keras_classifier(cfg, classes)
        self.model.compile(optimizer=tf.keras.optimizers.SGD(lr),
                           loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def step(self, data, rng):
        x = np.concatenate([d[0] for d in data])
        y = np.concatenate([d[1] for d in data])
        order = rng.permutation(len(y))
        ds = tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(self.batch)
        self.model.fit(ds, epochs=1, verbose=0)
        return float(len(y))


class ClientLoopNoTff(Method):
    """DP-FedEmb's client update (dpfedemb.federated._client_update_fn) without TFF.

    Traced into a TF1-style graph as TFF does (the Keras models cannot be built inside a
    ``tf.function``), then run in this process with a ``tf.compat.v1.Session``, one call per
    client: variable initialization and the update, fed the client's arrays."""

    name = "dp_fedemb_client_loop_no_tff"

    def __init__(self, spec: federated.ProcessSpec, initial: Any) -> None:
        update = federated._client_update_fn(spec)  # pylint: disable=protected-access
        s = spec.model.image
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.x = tf.compat.v1.placeholder(tf.uint8, [None, s.height, s.width, s.channels])
            self.y = tf.compat.v1.placeholder(tf.int32, [None])
            ds = tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(spec.train.batch_size)
            self.w = tff.learning.models.ModelWeights(
                trainable=[tf.compat.v1.placeholder(np.asarray(v).dtype, np.shape(v))
                           for v in initial.trainable],
                non_trainable=[tf.compat.v1.placeholder(np.asarray(v).dtype, np.shape(v))
                               for v in initial.non_trainable])
            result, out = update(self.w, ds)
            self.fetch = (result.update, out)
            self.init = tf.compat.v1.global_variables_initializer()
        self.sess = tf.compat.v1.Session(graph=self.graph)
        self.feed_w = {ph: np.asarray(v) for ph, v in zip(self.w.trainable, initial.trainable)}
        self.feed_w.update({ph: np.asarray(v)
                            for ph, v in zip(self.w.non_trainable, initial.non_trainable)})

    def step(self, data, rng):
        examples = 0.0
        for x, y in data:
            order = rng.permutation(len(y))
            self.sess.run(self.init)
            _, out = self.sess.run(self.fetch, {**self.feed_w, self.x: x[order],
                                                self.y: local_labels(y)[order]})
            examples += float(out["examples"])
        return examples


def _profile(method: TffMethod, data, rng, top: int) -> dict[str, Any]:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    method.step(data, rng)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)  # cumulative
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    by_tottime = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]

    def row(kv):
        (f, line, fn), (cc, nc, tt, ct, _) = kv
        return {"function": f"{os.path.basename(f)}:{line}({fn})", "calls": nc,
                "tottime": round(tt, 4), "cumtime": round(ct, 4)}
    return {"round_seconds": round(wall, 3),
            "note": "Python side only (main thread); the TensorFlow work runs in worker_binary, "
                    "so time waiting for it shows as lock 'acquire'",
            "top_cumulative": [row(kv) for kv in rows[:top]],
            "top_tottime": [row(kv) for kv in by_tottime], "_text": text.getvalue()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(prog="python -m bench.train", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--examples-per-client", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="rounds per method; round 1 is not timed")
    p.add_argument("--classes", type=int, default=20, help="global classes")
    p.add_argument("--classes-per-client", type=int, default=4)
    p.add_argument("--architecture", default="small_cnn", choices=["small_cnn", "mobilenet_v2_gn"])
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--reconstruction-steps", type=int, default=TrainConfig.reconstruction_steps)
    p.add_argument("--client-learning-rate", type=float, default=0.05)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--clip-norm", type=float, default=0.5)
    p.add_argument("--diagnostics", action="store_true",
                   help="also time: " + ", ".join(DIAGNOSTIC))
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="cProfile one extra round of each TFF method; keep the top N functions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=common.results_path("train"))
    a = p.parse_args(argv)
    if a.rounds < 2:
        p.error("--rounds must be >= 2 (round 1 is warm-up)")

    data = make_clients(a.clients, a.examples_per_client, a.classes, a.classes_per_client, a.seed)
    cfg = ModelConfig(architecture=a.architecture, embedding_dim=a.embedding_dim, seed=a.seed)
    tcfg = TrainConfig(algorithm="dp_fedemb", batch_size=a.batch_size,
                       max_examples_per_client=a.examples_per_client,
                       client_learning_rate=a.client_learning_rate,
                       reconstruction_steps=a.reconstruction_steps, rounds=a.rounds)
    pcfg = PrivacyConfig(mechanism="gaussian_fixed", noise_multiplier=a.noise_multiplier,
                         clip_norm=a.clip_norm, clients_per_round=a.clients)
    local_classes = max(len(np.unique(y)) for _, y in data)
    global_classes = a.classes
    emb_spec = federated.ProcessSpec(cfg, tcfg, pcfg, local_classes)
    cw_examples = lambda m: m["client_work"]["examples"]  # noqa: E731

    # Everything traced into graphs (TFF processes, the no-TFF client graph) is built before the
    # eager Keras model: Keras models built before TFF traces its computations become unusable.
    build_s: dict[str, float] = {}
    methods: list[Method] = []

    def timed_build(name: str, fn: Callable[[], Method]) -> None:
        t0 = time.perf_counter()
        methods.append(fn())
        build_s[name] = round(time.perf_counter() - t0, 2)
        print(f"built {name} in {build_s[name]:.1f} s", flush=True)

    timed_build("dp_fedemb", lambda: TffMethod(
        "dp_fedemb", federated.build_process(emb_spec), a.batch_size, True, cw_examples))

    def stock() -> Method:
        def model_fn() -> tff.learning.models.VariableModel:
            return tff.learning.models.from_keras_model(
                keras_classifier(cfg, global_classes),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                input_spec=emb_spec.element_spec)
        process = tff.learning.algorithms.build_unweighted_fed_avg(
            model_fn,
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(a.client_learning_rate),
            server_optimizer_fn=tff.learning.optimizers.build_sgdm(
                tcfg.server_learning_rate, momentum=tcfg.server_momentum or None),
            model_aggregator=tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
                a.noise_multiplier, a.clients, a.clip_norm))
        return TffMethod("stock_dp_fedavg", process, a.batch_size, False,
                         lambda m: m["client_work"]["train"]["num_examples"])
    timed_build("stock_dp_fedavg", stock)

    if a.diagnostics:
        import dataclasses
        no_recon = dataclasses.replace(emb_spec, train=dataclasses.replace(
            tcfg, reconstruction_steps=0))
        timed_build("dp_fedemb_no_recon", lambda: TffMethod(
            "dp_fedemb_no_recon", federated.build_process(no_recon), a.batch_size, True,
            cw_examples))
        avg_spec = federated.ProcessSpec(cfg, dataclasses.replace(tcfg, algorithm="dp_fedavg"),
                                         pcfg, global_classes)
        timed_build("dp_fedavg_ours", lambda: TffMethod(
            "dp_fedavg_ours", federated.build_process(avg_spec), a.batch_size, False,
            cw_examples))
        emb = methods[0]
        assert isinstance(emb, TffMethod)
        initial = emb.process.get_model_weights(emb.state)
        timed_build("dp_fedemb_client_loop_no_tff", lambda: ClientLoopNoTff(emb_spec, initial))
    timed_build("centralized", lambda: Centralized(cfg, global_classes, a.batch_size,
                                                   a.client_learning_rate))

    meter = _CpuMeter()
    rng = np.random.default_rng(a.seed + 1)
    rec: dict[str, dict[str, list[float]]] = {
        m.name: {"seconds": [], "examples": [], "cpu_main": [], "cpu_worker": []} for m in methods}
    for r in range(a.rounds):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            c0 = meter.read()
            t0 = time.perf_counter()
            ex = m.step(data, rng)
            dt = time.perf_counter() - t0
            c1 = meter.read()
            if r == 0:
                print(f"round 1 (warm-up, not timed) {m.name}: {dt:.1f} s", flush=True)
                continue
            rr = rec[m.name]
            rr["seconds"].append(dt)
            rr["examples"].append(ex)
            rr["cpu_main"].append(c1[0] - c0[0])
            rr["cpu_worker"].append(c1[1] - c0[1])
        if r:
            print(f"round {r + 1}: " + "  ".join(
                f"{m.name} {rec[m.name]['examples'][-1] / rec[m.name]['seconds'][-1]:.0f}/s"
                for m in methods), flush=True)

    summary: dict[str, dict[str, Any]] = {}
    for name, rr in rec.items():
        secs, exs = sum(rr["seconds"]), sum(rr["examples"])
        per_round = [e / s for e, s in zip(rr["examples"], rr["seconds"])]
        summary[name] = {
            "examples_per_s": round(exs / secs, 1),
            "median_round_examples_per_s": round(common.median(per_round), 1),
            "min_round_examples_per_s": round(min(per_round), 1),
            "max_round_examples_per_s": round(max(per_round), 1),
            "timed_rounds": len(secs_list := rr["seconds"]),
            "seconds_per_round": round(secs / len(secs_list), 3),
            "examples_per_round": exs / len(secs_list),
            "cpu_seconds_per_1000_examples": {
                "main_process": round(1000 * sum(rr["cpu_main"]) / exs, 3),
                "worker_binary": round(1000 * sum(rr["cpu_worker"]) / exs, 3)},
            "build_seconds": build_s[name]}
    emb = summary["dp_fedemb"]["examples_per_s"]
    ratios = {"dp_fedemb_over_centralized":
              round(emb / summary["centralized"]["examples_per_s"], 3),
              "dp_fedemb_over_stock_dp_fedavg":
                  round(emb / summary["stock_dp_fedavg"]["examples_per_s"], 3),
              "stock_dp_fedavg_over_centralized":
                  round(summary["stock_dp_fedavg"]["examples_per_s"]
                        / summary["centralized"]["examples_per_s"], 3)}
    # CPU seconds per example (this process + worker_binary): less sensitive to other jobs on
    # the machine than wall time. Ratios are written so that > 1 means DP-FedEmb is cheaper.
    cpu = {n: sum(s["cpu_seconds_per_1000_examples"].values()) for n, s in summary.items()}
    ratios["cpu_centralized_over_dp_fedemb"] = round(cpu["centralized"] / cpu["dp_fedemb"], 3)
    ratios["cpu_stock_dp_fedavg_over_dp_fedemb"] = round(cpu["stock_dp_fedavg"] / cpu["dp_fedemb"],
                                                         3)
    for name in DIAGNOSTIC:
        if name in summary:
            ratios[f"{name}_over_dp_fedemb"] = round(summary[name]["examples_per_s"] / emb, 3)
    aims = {"dp_fedemb_at_least_half_of_centralized": ratios["dp_fedemb_over_centralized"] >= 0.5,
            "dp_fedemb_not_slower_than_stock": ratios["dp_fedemb_over_stock_dp_fedavg"] >= 1.0}

    print()
    print(common.table(
        ["method", "examples/s", "median/s", "min/s", "max/s", "s/round", "cpu main/1k",
         "cpu worker/1k"],
        [[n, s["examples_per_s"], s["median_round_examples_per_s"],
          s["min_round_examples_per_s"], s["max_round_examples_per_s"], s["seconds_per_round"],
          s["cpu_seconds_per_1000_examples"]["main_process"],
          s["cpu_seconds_per_1000_examples"]["worker_binary"]] for n, s in summary.items()]))
    print()
    for k, v in {**ratios, **aims}.items():
        print(f"{k}: {v}")

    profiles = {}
    if a.profile:
        for m in methods:
            if isinstance(m, TffMethod) and m.name in ("dp_fedemb", "stock_dp_fedavg"):
                profiles[m.name] = _profile(m, data, rng, a.profile)
                print(f"\n== cProfile, one round of {m.name} "
                      f"({profiles[m.name]['round_seconds']} s), by tottime ==")
                print(profiles[m.name].pop("_text"))

    result = common.envelope("train", argv, started)
    result.update({
        "setup": {"clients": a.clients, "examples_per_client": a.examples_per_client,
                  "batch_size": a.batch_size, "rounds": a.rounds, "timed_rounds": a.rounds - 1,
                  "global_classes": global_classes, "classes_per_client": a.classes_per_client,
                  "local_head_classes": local_classes, "model": as_dict(cfg),
                  "train": as_dict(tcfg), "privacy": as_dict(pcfg),
                  "counted_examples": "joint (full-model) pass only; DP-FedEmb's "
                                      f"{a.reconstruction_steps} head-only reconstruction batches "
                                      "per client are extra, uncounted work",
                  "tff_execution": "default sync local C++ context (worker_binary)"},
        "results": summary, "ratios": ratios, "aims": aims, "profiles": profiles,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2)})
    common.save(a.results, result)
    stop_tff_workers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
