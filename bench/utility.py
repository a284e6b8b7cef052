"""Utility study (issue #9): embedding quality against epsilon, DP-FedEmb vs DP-FedAvg, with the
non-private references, on Fashion-MNIST and Omniglot.

``python -m bench.utility [--datasets fashion-mnist omniglot] [--epsilons 1 2 4 8]
[--algorithms dp_fedemb dp_fedavg] [--rounds 20] [--clients-per-round 50] [--workdir DIR] ...``

Per dataset, in one process:

1. Import (simulated users: non-IID, Dirichlet 0.5, seeded), partition (k = 1 user per virtual
   client, at most 64 examples per user), pretrain on the public split; all cached under
   ``--workdir`` (default /tmp/dpfedemb-bench), so a rerun with the same settings skips them.
   - ``fashion-mnist``: private = the train split minus its first 2,000 images (the public split,
     the importer's default), ~11 examples per user (5,273 users over 58,000 images);
     eval = the test split (people outside the population; the same 10 classes).
   - ``omniglot`` (../shared/data/omniglot, pixels inverted so ink is bright): the Korean and
     Tagalog alphabets (57 characters, 1,140 images) are the eval split: classes never seen in
     training. Public = the Greek and Latin alphabets (50 characters, 1,000 images: a separate
     set of alphabets, no user in common with the private population); private = the other four
     alphabets (Balinese, Early Aramaic, Japanese katakana, Sanskrit: 135 characters, 2,700
     images) with simulated users (~5 examples per user, ~540 users).
     ``--omniglot-public-alphabets`` with no names uses the importer's user-disjoint
     ``public_fraction`` of the six alphabets instead; measured: 10 pretraining epochs on those
     ~730 images (about 4 per character) gave recall@1 0.446, below raw pixels (0.466) and
     random init (0.593), while 3 epochs on Greek + Latin gave 0.639.
2. Rows, each evaluated on the eval split with :func:`dpfedemb.evaluate.evaluate` (cosine
   recall@1 and TAR@FAR=1e-3, 95% class-bootstrap intervals):
   ``raw_pixels``; ``random_init`` (the untrained backbone); ``pretrained`` (public data only);
   ``centralized`` (non-private Keras training on the whole private split, starting from the
   pretrained model); for each algorithm (``dp_fedemb``: local heads, backbone aggregated;
   ``dp_fedavg``: one global head, whole model aggregated) a non-private federated run (noise 0,
   the same clipping and schedule, epsilon = infinity) and one DP run per target epsilon.
   Every federated run starts from the pretrained model with the same hyperparameters
   (PipelineParams' measured defaults: server SGD lr 0.3 momentum 0.5, client lr 0.05, clip 0.5,
   batch 16, at most 32 examples per client per round), Poisson sampling with the expected
   ``--clients-per-round``, a fixed ``--rounds``, delta = ``--delta`` (must be < 1/users).
   The noise multiplier of each target epsilon is :func:`dpfedemb.privacy.calibrate_noise` for
   these rounds and this sampling rate (PLD; cached); the table shows the accounted epsilon.
   Client sampling is seeded (``--seed``, the same sample sequence for every method: a
   benchmark-only choice on public data); TFF's DP noise is unseeded, so a DP row is one draw:
   use ``--repeats`` for several.
3. Prints the tables, writes ``bench/results/utility_<dataset>.json`` (date, machine, command,
   every setting, every row, the DP-FedEmb vs DP-FedAvg and private vs non-private comparisons)
   and ``bench/results/utility_<dataset>.png`` (recall@1 against epsilon).

TFF's worker process is stopped after every federated run (its memory grows ~150-190 MB per
round and is never released; TFF starts a fresh one for the next run).
Trained models are cached too (keyed by every setting and the repeat index), so an interrupted
study resumes; ``--retrain`` trains again. Sizing: one 20-round run with 50 clients of 32
examples takes 20-90 s on the 2 shared cores; the default study (2 datasets x 10 federated
runs, plus imports, calibration, pretraining and evaluation) about 25-40 min (measured 36 min
with one 20-min out-of-memory stall, before the worker restart above).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.plot_utility import plot  # noqa: E402
from dpfedemb import model as model_lib  # noqa: E402
from dpfedemb import partition as partition_lib  # noqa: E402
from dpfedemb import privacy, storage  # noqa: E402
from dpfedemb.config import (ImageSpec, ModelConfig, PartitionConfig, PipelineParams,  # noqa: E402
                             PretrainConfig, PrivacyConfig, SimulationConfig, TrainConfig,
                             as_dict)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("fashion-mnist", "omniglot")
ALGORITHMS = ("dp_fedemb", "dp_fedavg")
OMNIGLOT = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "omniglot",
                                         "omniglot_small12_28x28.npz"))
# Per-dataset defaults (a flag overrides them for every dataset).
PER_DATASET = {
    "fashion-mnist": {"mean_examples_per_user": 11.0, "pretrain_epochs": 3,
                      "centralized_epochs": 2},
    # Softmax training overfits Omniglot's few images per character fast and then hurts the
    # embeddings of unseen characters (Greek + Latin public: 3 epochs 0.639, 10 epochs 0.548).
    "omniglot": {"mean_examples_per_user": 5.0, "pretrain_epochs": 3,
                 "centralized_epochs": 3},
}
FAR = "0.001"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------- data

def import_dataset(name: str, a: argparse.Namespace, mean_per_user: float) -> tuple[str, dict]:
    """Import (or reuse) the dataset; returns (data dir, settings that define it)."""
    from dpfedemb.data import importers

    sim = SimulationConfig(mean_examples_per_user=mean_per_user,
                           dirichlet_alpha=a.dirichlet_alpha, seed=a.data_seed)
    if name == "fashion-mnist":
        settings = {"dataset": name, "source": a.fmnist_dir, "simulation": dataclasses.asdict(sim),
                    "public": "first train images", "public_examples": a.fmnist_public_examples,
                    "max_train": a.fmnist_max_train, "max_test": a.fmnist_max_test}
    else:
        settings = {"dataset": name, "source": a.omniglot, "simulation": dataclasses.asdict(sim),
                    "holdout_alphabets": a.omniglot_holdout, "invert": True}
        if a.omniglot_public_alphabets:
            settings.update(public="separate alphabets (no user in common)",
                            public_alphabets=a.omniglot_public_alphabets)
        else:
            settings.update(public="user-disjoint fraction of the non-held-out alphabets' users",
                            public_fraction=a.omniglot_public_fraction)
    root = os.path.join(a.workdir, f"{name}-{_hash(settings)}")
    data = os.path.join(root, "data")
    if storage.is_complete(data):
        _say(f"[{name}] data: cached {data}")
        return data, settings
    t0 = time.time()
    if os.path.exists(data):
        shutil.rmtree(data)
    if name == "fashion-mnist":
        importers.import_fashion_mnist(a.fmnist_dir, data, sim, max_train=a.fmnist_max_train,
                                       max_test=a.fmnist_max_test, public="fashion-mnist",
                                       public_examples=a.fmnist_public_examples)
    else:
        import_omniglot(a, data, sim)
    _say(f"[{name}] data: imported to {data} in {time.time() - t0:.0f} s")
    return data, settings


def import_omniglot(a: argparse.Namespace, output: str, sim: SimulationConfig) -> dict:
    """Omniglot: held-out alphabets -> eval; public alphabets (or a user-disjoint fraction) ->
    public; the rest -> private with simulated users. Pixels inverted (ink = 0 in the file)."""
    from dpfedemb.data import importers

    d = np.load(a.omniglot, allow_pickle=False)
    alphabets = [str(s) for s in d["alphabets"]]
    unknown = sorted(set(a.omniglot_holdout + a.omniglot_public_alphabets) - set(alphabets))
    if unknown or set(a.omniglot_holdout) & set(a.omniglot_public_alphabets):
        raise SystemExit(f"error: alphabets {unknown} not in {alphabets}, or an alphabet both "
                         "held out and public")
    x, y = d["images"].astype(np.uint8), d["char_class"].astype(np.int64)
    alphabet = d["alphabet_of_class"][y]
    held_classes = np.flatnonzero(np.isin(d["alphabet_of_class"],
                                          [alphabets.index(s) for s in a.omniglot_holdout]))
    source, licence = f"omniglot:{a.omniglot}", "MIT (Lake, Salakhutdinov, Tenenbaum; Omniglot)"
    if not a.omniglot_public_alphabets:
        return importers.import_arrays(x, y, None, output, sim, source=source, licence=licence,
                                       holdout_classes=[int(c) for c in held_classes],
                                       public_fraction=a.omniglot_public_fraction, invert=True)
    x = 255 - x
    ev = np.isin(y, held_classes)
    pub = ~ev & np.isin(alphabet, [alphabets.index(s) for s in a.omniglot_public_alphabets])
    priv = ~ev & ~pub
    splits = {
        "private": (x[priv], y[priv],
                    importers.with_simulated_users(y[priv], sim, "omniglot-user")),
        "eval": (x[ev], y[ev], [b"eval-%06d" % i for i in range(int(ev.sum()))]),
        "public": (x[pub], y[pub], [b"public"] * int(pub.sum())),
    }
    return importers.write_dataset(
        output, splits, source=source, licence=licence, spec=ImageSpec(28, 28, 1),
        extra={"simulation": dataclasses.asdict(sim), "holdout_alphabets": a.omniglot_holdout,
               "public_alphabets": a.omniglot_public_alphabets,
               "holdout_classes": [int(c) for c in held_classes], "inverted": True})


def partition_dataset(name: str, root: str, data: str, cfg: PartitionConfig) -> tuple[str, dict]:
    part = os.path.join(root, f"partition-{_hash(as_dict(cfg))}")
    if storage.is_complete(part):
        _say(f"[{name}] partition: cached {part}")
        return part, storage.read_json(os.path.join(part, "stats.json"))
    if os.path.exists(part):
        shutil.rmtree(part)
    t0 = time.time()
    # Simulated users of a public data set: the public test key keeps the partition (and so the
    # cache) deterministic. Never use it on real users.
    stats = partition_lib.run_partition(os.path.join(data, "private-*.tfrecord"), part, cfg,
                                        partition_lib.INSECURE_TEST_KEY)
    _say(f"[{name}] partition: {stats['users']} users, {stats['virtual_clients']} virtual clients "
         f"in {time.time() - t0:.0f} s")
    return part, stats


def centralized_model(name: str, out: str, glob: str, model_cfg: ModelConfig,
                      cfg: PretrainConfig, init: Optional[str], what: str) -> dict:
    """Pretrain (or train centrally from ``init``) once; cached; returns its metrics.json."""
    from dpfedemb import pretrain

    if storage.is_complete(out):
        _say(f"[{name}] {what}: cached {out}")
        return storage.read_json(os.path.join(out, "metrics.json"))
    if os.path.exists(out):
        shutil.rmtree(out)
    t0 = time.time()
    metrics = pretrain.run_pretrain(glob, out, model_cfg, cfg, init=init)
    _say(f"[{name}] {what}: {cfg.epochs} epochs on {metrics['examples']} examples in "
         f"{time.time() - t0:.0f} s (train accuracy {metrics['accuracy'][-1]:.3f})")
    return metrics


# ------------------------------------------------------------------------------------ privacy

def calibrated_noise(root: str, target: float, mech: privacy.Mechanism) -> float:
    """calibrate_noise for ``target``, cached in ``root/calibration.json``."""
    path = os.path.join(root, "calibration.json")
    cache = storage.read_json(path) if os.path.exists(path) else {}
    key = json.dumps({"target": target, **{k: v for k, v in mech.to_dict().items()
                                           if k != "noise_multiplier"}}, sort_keys=True)
    if key not in cache:
        t0 = time.time()
        cache[key] = privacy.calibrate_noise(target, mech)
        _say(f"    calibrated epsilon {target:g}: noise multiplier {cache[key]:.4f} "
             f"({time.time() - t0:.0f} s)")
        storage.write_json_atomic(path, cache)
    return float(cache[key])


# ----------------------------------------------------------------------------------- training

def train_run(out: str, part: str, init: str, tcfg: TrainConfig, pcfg: PrivacyConfig,
              retrain: bool) -> tuple[dict, dict, float, bool]:
    """(privacy.json, metrics.json, seconds, cached) of one federated run (trained if needed)."""
    from dpfedemb import train

    timing = os.path.join(out + "-seconds.json")
    if storage.is_complete(out) and not retrain:
        secs = storage.read_json(timing)["seconds"] if os.path.exists(timing) else float("nan")
        return (storage.read_json(os.path.join(out, "privacy.json")),
                storage.read_json(os.path.join(out, "metrics.json")), secs, True)
    if os.path.exists(out):
        shutil.rmtree(out)
    ckpt = out + "-checkpoints"
    t0 = time.time()
    try:
        record = train.run_training(part, init, out, tcfg, pcfg, checkpoint_dir=ckpt)
    finally:
        # TFF's worker_binary grows by ~150-190 MB per round and never gives it back (measured:
        # 1.9 GB after 10 rounds; 11.8 GB after four 20-round runs, and an earlier worker was
        # killed out of memory after 14 runs). A fresh worker per run bounds it; TFF starts
        # the next one on the next computation.
        train.stop_tff_workers()
    secs = time.time() - t0
    if os.path.exists(ckpt):
        shutil.rmtree(ckpt)
    storage.write_json_atomic(timing, {"seconds": secs})
    return record, storage.read_json(os.path.join(out, "metrics.json")), secs, False


def diagnostics(metrics: dict) -> dict:
    """Non-private training diagnostics (means over rounds; not covered by epsilon)."""
    rounds = metrics.get("rounds", [])

    def mean(key: str, last: Optional[int] = None) -> Optional[float]:
        v = [r[key] for r in rounds[-last if last else 0:] if r.get(key) is not None]
        return float(np.mean(v)) if v else None
    return {"rounds_run": metrics.get("rounds_run"),
            "loss_first_round": rounds[0].get("loss") if rounds else None,
            "loss_last_5_rounds": mean("loss", 5),
            "fraction_clipped": mean("fraction_clipped"),
            "mean_update_norm": mean("mean_update_norm"),
            "mean_clients_per_round": mean("clients"),
            "examples_per_second": mean("examples_per_second", 1)}


# ---------------------------------------------------------------------------------- reporting

def _num(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _metric(info: dict) -> dict:
    s = info["subsets"]["all"]
    t = s["tar_at_far"][FAR]
    return {"recall_at_1": s["recall_at_1"], "recall_at_1_ci": s["recall_at_1_ci"],
            "tar_at_far_1e-3": t["tar"], "tar_at_far_1e-3_ci": t["ci"],
            "far_resolved": t["resolved"], "eval_examples": s["examples"],
            "eval_classes": s["classes"]}


def _mean(vals: list) -> Optional[float]:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (method, target epsilon): the mean over repeats, each repeat kept."""
    rows: dict[tuple, dict] = {}
    for r in runs:
        key = (r["method"], r["target_epsilon"])
        rows.setdefault(key, {"method": r["method"], "private": r["private"],
                              "target_epsilon": r["target_epsilon"], "repeats": []})
        rows[key]["repeats"].append(r)
    out = []
    for row in rows.values():
        reps = row["repeats"]
        for k in ("recall_at_1", "tar_at_far_1e-3", "train_seconds", "noise_multiplier"):
            row[k] = _mean([_num(x.get(k)) for x in reps])
        for k in ("recall_at_1_ci", "tar_at_far_1e-3_ci"):
            row[k] = reps[0].get(k) if len(reps) == 1 else None
        if len(reps) > 1:
            row["recall_at_1_std"] = float(np.std([x["recall_at_1"] for x in reps], ddof=1))
        row["epsilon"] = reps[0].get("epsilon")
        out.append(row)
    return out


def compare(rows: list[dict], epsilons: Sequence[float]) -> dict:
    """DP-FedEmb vs DP-FedAvg at each epsilon, and each DP row vs its non-private references."""
    def get(method: str, eps: Optional[float]) -> Optional[dict]:
        for r in rows:
            if r["method"] == method and r["target_epsilon"] == eps:
                return r
        return None
    central = get("centralized", None)
    out: dict[str, Any] = {"definitions": {
        "drop_points": "non-private recall@1 minus DP recall@1, in absolute points (0.05 = 5 "
                       "percentage points)",
        "relative": "DP recall@1 / non-private recall@1",
        "within_5_percent": "drop_points <= 0.05 (absolute); within_5_percent_relative: "
                            "relative >= 0.95",
        "note": "one DP draw per row unless repeats > 1; class-bootstrap CIs are in the rows"},
        "per_epsilon": {}}
    for eps in epsilons:
        emb, avg = get("dp_fedemb", eps), get("dp_fedavg", eps)
        entry: dict[str, Any] = {}
        if emb and avg and emb["recall_at_1"] is not None and avg["recall_at_1"] is not None:
            entry["fedemb_minus_fedavg_recall_at_1"] = emb["recall_at_1"] - avg["recall_at_1"]
            if emb["tar_at_far_1e-3"] is not None and avg["tar_at_far_1e-3"] is not None:
                entry["fedemb_minus_fedavg_tar_at_far_1e-3"] = (emb["tar_at_far_1e-3"]
                                                               - avg["tar_at_far_1e-3"])
            entry["dp_fedemb_beats_dp_fedavg_recall_at_1"] = emb["recall_at_1"] > avg["recall_at_1"]
        for method, dp in (("dp_fedemb", emb), ("dp_fedavg", avg)):
            if not dp or dp["recall_at_1"] is None:
                continue
            for ref_name, ref in ((f"{method}_nonprivate", get(method, None)),
                                  ("centralized", central)):
                if ref and ref["recall_at_1"]:
                    drop = ref["recall_at_1"] - dp["recall_at_1"]
                    rel = dp["recall_at_1"] / ref["recall_at_1"]
                    entry[f"{method}_vs_{ref_name}"] = {
                        "drop_points": drop, "relative": rel, "within_5_percent": drop <= 0.05,
                        "within_5_percent_relative": rel >= 0.95}
        out["per_epsilon"][f"{eps:g}"] = entry
    return out


def _fmt(x: Any, nd: int = 3) -> str:
    v = _num(x)
    return "-" if v is None else f"{v:.{nd}f}"


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def table_text(rows: list[dict]) -> str:
    def nonpriv(method: str) -> Optional[float]:
        for r in rows:
            if r["method"] == method and not r["private"]:
                return r["recall_at_1"]
        return None
    body = []
    for r in rows:
        eps = r.get("epsilon")
        ref = nonpriv(r["method"]) if r["private"] else None
        body.append([
            r["method"], "inf" if r["target_epsilon"] is None and r["method"].startswith("dp_")
            else ("-" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"),
            "-" if eps is None else (eps if isinstance(eps, str) else f"{eps:.3f}"),
            _fmt(r.get("noise_multiplier"), 4) if r["method"].startswith("dp_") else "-",
            _fmt(r["recall_at_1"]) + (f" +-{r['recall_at_1_std']:.3f}"
                                      if r.get("recall_at_1_std") is not None else ""),
            _ci(r.get("recall_at_1_ci")), _fmt(r["tar_at_far_1e-3"]),
            _ci(r.get("tar_at_far_1e-3_ci")),
            "-" if ref is None or r["recall_at_1"] is None else f"{r['recall_at_1'] - ref:+.3f}",
            _fmt(r.get("train_seconds"), 0)])
    return common.table(["method", "eps target", "eps accounted", "z", "recall@1", "95% CI",
                         "TAR@FAR1e-3", "95% CI", "vs z=0", "train s"], body)


def order_key(r: dict) -> tuple:
    order = {"raw_pixels": 0, "random_init": 1, "pretrained": 2, "centralized": 3,
             "dp_fedemb": 4, "dp_fedavg": 5}
    eps = r["target_epsilon"]
    return (order.get(r["method"], 9), 0 if eps is None else 1, -(eps or 0))


# -------------------------------------------------------------------------------------- study

def run_dataset(name: str, a: argparse.Namespace, argv: Sequence[str], started: float) -> dict:
    from dpfedemb import evaluate as evaluate_lib

    t_start = time.time()
    d = PER_DATASET[name]
    mean_per_user = a.mean_examples_per_user or d["mean_examples_per_user"]
    pre_epochs = a.pretrain_epochs if a.pretrain_epochs is not None else d["pretrain_epochs"]
    cen_epochs = a.centralized_epochs if a.centralized_epochs is not None \
        else d["centralized_epochs"]
    data, data_settings = import_dataset(name, a, mean_per_user)
    root = os.path.dirname(data)
    card = storage.read_json(os.path.join(data, "card.json"))
    spec = ImageSpec(**card["image"])
    pcfg_part = PartitionConfig(users_per_client=1, max_examples_per_user=a.max_examples_per_user,
                                seed=a.data_seed)
    part, stats = partition_dataset(name, root, data, pcfg_part)
    users, n_clients = int(stats["users"]), int(stats["virtual_clients"])
    if not a.delta < 1.0 / users:
        raise SystemExit(f"error: --delta {a.delta} is not below 1/users = 1/{users}")
    if a.clients_per_round > n_clients:
        raise SystemExit(f"error: --clients-per-round {a.clients_per_round} > {n_clients} clients")
    model_cfg = ModelConfig(image=spec, seed=a.seed)
    models_dir = os.path.join(root, "models")
    models: list[tuple[str, str]] = []
    runs: list[dict] = []

    # Centralized models first (Keras, before TFF traces anything in this process).
    if a.random_init:
        rnd = os.path.join(models_dir, f"random-init-s{a.seed}")
        if not storage.is_complete(rnd):
            model_lib.save_backbone(model_lib.build_backbone(model_cfg), model_cfg, rnd)
        models.append(("random_init", rnd))
        runs.append({"method": "random_init", "private": False, "target_epsilon": None,
                     "name": "random_init", "model_dir": rnd})
    pre_cfg = PretrainConfig(epochs=pre_epochs, seed=a.seed)
    pre = os.path.join(models_dir, f"pretrained-{_hash([as_dict(pre_cfg), as_dict(model_cfg)])}")
    pre_metrics = centralized_model(name, pre, os.path.join(data, "public-*.tfrecord"), model_cfg,
                                    pre_cfg, None, "pretrain (public)")
    models.append(("pretrained", pre))
    runs.append({"method": "pretrained", "private": False, "target_epsilon": None,
                 "name": "pretrained", "model_dir": pre, "epochs": pre_epochs,
                 "train_examples": pre_metrics["examples"],
                 "train_seconds": pre_metrics.get("seconds")})
    if a.centralized:
        cen_cfg = PretrainConfig(epochs=cen_epochs, seed=a.seed)
        cen = os.path.join(models_dir, f"centralized-{_hash([as_dict(cen_cfg), pre])}")
        cen_metrics = centralized_model(name, cen, os.path.join(data, "private-*.tfrecord"),
                                        model_cfg, cen_cfg, pre, "centralized (private split, "
                                        "non-private)")
        models.append(("centralized", cen))
        runs.append({"method": "centralized", "private": False, "target_epsilon": None,
                     "name": "centralized", "model_dir": cen, "epochs": cen_epochs,
                     "train_examples": cen_metrics["examples"],
                     "train_seconds": cen_metrics.get("seconds")})

    # Federated runs.
    base_priv = PrivacyConfig(mechanism="gaussian_fixed", noise_multiplier=1.0,
                              clip_norm=a.clip_norm, sampling="poisson",
                              clients_per_round=a.clients_per_round, delta=a.delta,
                              accountant=a.accountant)
    mech = privacy.mechanism_from(base_priv, n_clients, 1, a.rounds)
    targets: list[Optional[float]] = ([None] if a.nonprivate else []) + \
        sorted(a.epsilons, reverse=True)
    noise = {None: 0.0}
    for eps in sorted(a.epsilons):
        noise[eps] = calibrated_noise(root, eps, mech)
    plan = [(eps, algo, rep) for eps in targets for algo in a.algorithms
            for rep in range(a.repeats)]
    done_secs: list[float] = []
    for i, (eps, algo, rep) in enumerate(plan):
        tcfg = TrainConfig(algorithm=algo, rounds=a.rounds,
                           client_learning_rate=a.client_learning_rate,
                           batch_size=a.batch_size,
                           max_examples_per_client=a.max_examples_per_client,
                           server_learning_rate=a.server_learning_rate,
                           server_momentum=a.server_momentum, seed=a.seed + rep)
        pcfg = dataclasses.replace(base_priv, noise_multiplier=noise[eps])
        label = f"{algo}_{'nonprivate' if eps is None else f'eps{eps:g}'}_rep{rep}"
        out = os.path.join(models_dir, f"{label}-{_hash([as_dict(tcfg), as_dict(pcfg), pre])}")
        left = len(plan) - i
        eta = f", ~{np.mean(done_secs) * left / 60:.0f} min left for {left} runs" if done_secs \
            else ""
        _say(f"[{name}] {i + 1}/{len(plan)} {label}: z={noise[eps]:.4f}, {a.rounds} rounds"
             f"{eta}")
        record, metrics, secs, cached = train_run(out, part, pre, tcfg, pcfg, a.retrain)
        if not cached:
            done_secs.append(secs)
        _say(f"    {'cached' if cached else f'{secs:.0f} s'}: epsilon {record['epsilon']}, "
             f"last-round loss {(metrics['rounds'] or [{}])[-1].get('loss')}")
        models.append((label, out))
        runs.append({"method": algo, "private": eps is not None, "target_epsilon": eps,
                     "name": label, "model_dir": out, "repeat": rep,
                     "noise_multiplier": noise[eps], "epsilon": record["epsilon"],
                     "delta": record["delta"], "sampling_rate": record["sampling_rate"],
                     "rounds": record["rounds"], "train_seconds": secs, "cached": cached,
                     "diagnostics": diagnostics(metrics)})

    _say(f"[{name}] evaluating {len(models)} models + raw pixels on the eval split ...")
    t0 = time.time()
    seen = card["splits"]["private"]["classes"]
    ev = evaluate_lib.evaluate(os.path.join(data, "eval-*.tfrecord"), models, seen_classes=seen,
                               seen_source="private split of the card", image_spec=spec,
                               protocol=evaluate_lib.Protocol(
                                   bootstrap_resamples=a.bootstrap_resamples, seed=a.seed))
    eval_seconds = time.time() - t0
    runs.insert(0, {"method": "raw_pixels", "private": False, "target_epsilon": None,
                    "name": "raw_pixels"})
    for r in runs:
        r.update(_metric(ev["models"][r["name"]]))
    rows = sorted(aggregate(runs), key=order_key)
    comparison = compare(rows, sorted(a.epsilons))
    table = table_text(rows)
    header = (f"{name}: {users} users ({n_clients} virtual clients, k=1), eval "
              f"{ev['data']['examples']} images / {ev['data']['classes']} classes "
              f"({'unseen' if ev['subsets']['unseen'].get('available') else 'seen'} classes), "
              f"{a.rounds} rounds, {a.clients_per_round} clients/round expected (q="
              f"{mech.sampling_rate:.4f}), delta={a.delta:g}")
    _say("\n" + header + "\n" + table)
    for eps, c in comparison["per_epsilon"].items():
        bits = []
        if "fedemb_minus_fedavg_recall_at_1" in c:
            bits.append(f"FedEmb-FedAvg recall@1 {c['fedemb_minus_fedavg_recall_at_1']:+.3f}")
        for k in ("dp_fedemb_vs_dp_fedemb_nonprivate", "dp_fedemb_vs_centralized"):
            if k in c:
                bits.append(f"FedEmb drop vs {k.split('_vs_')[1]} {c[k]['drop_points']:+.3f} "
                            f"(within 5 points: {c[k]['within_5_percent']})")
        _say(f"  eps {eps}: " + "; ".join(bits))
    settings = {
        "data": data_settings, "partition": as_dict(pcfg_part), "model": as_dict(model_cfg),
        "pretrain": {"epochs": pre_epochs, "data": "public split"},
        "centralized": {"epochs": cen_epochs, "data": "private split (all of it)",
                        "init": "pretrained"} if a.centralized else None,
        "rounds": a.rounds, "clients_per_round": a.clients_per_round,
        "sampling": "poisson", "sampling_rate": mech.sampling_rate, "delta": a.delta,
        "accountant": a.accountant, "mechanism": "gaussian_fixed", "clip_norm": a.clip_norm,
        "client_learning_rate": a.client_learning_rate, "batch_size": a.batch_size,
        "max_examples_per_client": a.max_examples_per_client,
        "server_learning_rate": a.server_learning_rate, "server_momentum": a.server_momentum,
        "head_lr_scale": TrainConfig().head_lr_scale,
        "reconstruction_steps": TrainConfig().reconstruction_steps,
        "epsilons": sorted(a.epsilons), "algorithms": list(a.algorithms),
        "noise_multipliers": {("nonprivate" if k is None else f"{k:g}"): v
                              for k, v in noise.items()},
        "repeats": a.repeats, "sampling_seed": a.seed,
        "dp_noise": "TFF's Gaussian aggregator, unseeded (each DP row is one draw)",
        "nonprivate_federated": "noise multiplier 0: same clipping, sampling and schedule",
        "bootstrap_resamples": a.bootstrap_resamples, "workdir": root,
    }
    result = {**common.envelope("utility", argv, started), "dataset": name, "tag": a.tag,
              "users": users, "virtual_clients": n_clients,
              "card": {k: card[k] for k in ("source", "licence", "image", "splits",
                                            "raw_pixel_recall_at_1") if k in card},
              "partition_stats": {k: stats.get(k) for k in ("records_in", "examples_kept",
                                                            "users", "virtual_clients",
                                                            "examples_over_cap", "classes")},
              "settings": settings, "rows": rows, "comparison": comparison,
              "evaluation": {"protocol": ev["protocol"], "subsets": ev["subsets"],
                             "seconds": round(eval_seconds, 1)},
              "dataset_seconds": round(time.time() - t_start, 1),
              "header": header, "table": table.splitlines()}
    os.makedirs(a.results_dir, exist_ok=True)
    stem = f"utility_{name}" + (f"_{a.tag}" if a.tag else "")
    common.save(os.path.join(a.results_dir, f"{stem}.json"), _finite(result))
    png = os.path.join(a.results_dir, f"{stem}.png")
    plot(result, png)
    _say(f"saved {png}")
    return result


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    pp = PipelineParams()
    p = argparse.ArgumentParser(prog="python -m bench.utility", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    p.add_argument("--no-nonprivate", dest="nonprivate", action="store_false",
                   help="skip the noise-0 federated runs")
    p.add_argument("--no-centralized", dest="centralized", action="store_false")
    p.add_argument("--no-random-init", dest="random_init", action="store_false")
    p.add_argument("--rounds", type=int, default=pp.rounds)
    p.add_argument("--clients-per-round", type=int, default=pp.clients_per_round)
    p.add_argument("--max-examples-per-client", type=int, default=pp.max_examples_per_client)
    p.add_argument("--max-examples-per-user", type=int, default=pp.max_examples_per_user)
    p.add_argument("--batch-size", type=int, default=pp.batch_size)
    p.add_argument("--clip-norm", type=float, default=pp.clip_norm)
    p.add_argument("--client-learning-rate", type=float, default=pp.client_learning_rate)
    p.add_argument("--server-learning-rate", type=float, default=pp.server_learning_rate)
    p.add_argument("--server-momentum", type=float, default=pp.server_momentum)
    p.add_argument("--delta", type=float, default=pp.delta)
    p.add_argument("--accountant", choices=["pld", "rdp"], default=pp.accountant)
    p.add_argument("--repeats", type=int, default=1, help="federated runs per setting")
    p.add_argument("--seed", type=int, default=0, help="model, pretraining, sampling, eval seed")
    p.add_argument("--data-seed", type=int, default=0, help="user simulation and partition seed")
    p.add_argument("--mean-examples-per-user", type=float, default=None,
                   help="simulated users (default: 11 Fashion-MNIST, 5 Omniglot)")
    p.add_argument("--dirichlet-alpha", type=float, default=0.5)
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="default: 3 (both datasets)")
    p.add_argument("--centralized-epochs", type=int, default=None,
                   help="default: 2 Fashion-MNIST, 3 Omniglot")
    p.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--fmnist-public-examples", type=int, default=2000)
    p.add_argument("--fmnist-max-train", type=int, default=None, help="smoke runs only")
    p.add_argument("--fmnist-max-test", type=int, default=None, help="smoke runs only")
    p.add_argument("--omniglot", default=OMNIGLOT, help="omniglot_small12_28x28.npz")
    p.add_argument("--omniglot-holdout", nargs="+", default=["Korean", "Tagalog"])
    p.add_argument("--omniglot-public-alphabets", nargs="*", default=["Greek", "Latin"],
                   help="public split; none: --omniglot-public-fraction of the users instead")
    p.add_argument("--omniglot-public-fraction", type=float, default=0.2)
    p.add_argument("--bootstrap-resamples", type=int, default=100)
    p.add_argument("--workdir", default="/tmp/dpfedemb-bench", help="cache of data and models")
    p.add_argument("--retrain", action="store_true", help="ignore cached federated models")
    p.add_argument("--results-dir", default=common.RESULTS_DIR)
    p.add_argument("--tag", default="", help="results as utility_<dataset>_<tag>.json/.png")
    p.add_argument("--verbose", action="store_true", help="log every round")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    a.workdir = os.path.abspath(a.workdir)
    a.results_dir = os.path.abspath(a.results_dir)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", force=True)
    if not a.epsilons and not a.nonprivate:
        raise SystemExit("error: no federated runs: give --epsilons or drop --no-nonprivate")
    # A process started in the background by a non-interactive shell (``cmd &``, nohup) inherits
    # SIGINT as ignored, and so does TFF's worker_binary; dpfedemb.train.stop_tff_workers then
    # waits forever for a worker that ignores the SIGINT TFF sends it. Children exec'd after a
    # handler is installed get the default action again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from dpfedemb.train import stop_tff_workers
    try:
        for name in a.datasets:
            run_dataset(name, a, argv, started)
    finally:
        stop_tff_workers()
    _say(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
