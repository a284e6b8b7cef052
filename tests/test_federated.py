"""DP-FedEmb on TFF: what is aggregated, sensitivity, noise, accounting, resume, budget."""
import dataclasses
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from dpfedemb import federated, partition, privacy, train
from dpfedemb import model as model_lib
from dpfedemb.config import ModelConfig, PartitionConfig, PrivacyConfig, TrainConfig
from dpfedemb.data import records, schema

KEY = b"0123456789abcdef-test-key"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 users x 8 examples (3 classes each), k=1, and an untrained small backbone."""
    d = tmp_path_factory.mktemp("fed")
    rng = np.random.default_rng(0)
    recs = []
    for u in range(12):
        for i in range(8):
            c = (u + i % 3) % 6
            x = rng.integers(0, 60, (28, 28)).astype(np.uint8)
            x[4 * c:4 * c + 5] = 200
            recs.append(schema.make_example(schema.encode_image(x), c, b"user-%d" % u))
    records.write_shards(recs, str(d / "in"), "private", 1)
    part = str(d / "part")
    partition.run_partition(str(d / "in" / "*.tfrecord"), part, PartitionConfig(), KEY)
    cfg = ModelConfig(embedding_dim=16, seed=0)
    init = str(d / "init")
    model_lib.save_backbone(model_lib.build_backbone(cfg), cfg, init)
    yield {"dir": d, "part": part, "init": init, "cfg": cfg}
    train.stop_tff_workers()


FAST = dict(rounds=6, batch_size=8, max_examples_per_client=16, checkpoint_every=2, seed=1)


def _weights(path):
    data = np.load(io.BytesIO(open(os.path.join(path, "weights.npz"), "rb").read()))
    return [data[f"arr_{i}"] for i in range(len(data.files))]


def _run(setup, name, tcfg, pcfg, **kw):
    out = str(setup["dir"] / name)
    rec = train.run_training(setup["part"], setup["init"], out, tcfg, pcfg,
                             checkpoint_dir=out + "-ckpt", **kw)
    return out, rec


def test_only_backbone_is_aggregated_in_dp_fedemb(setup):
    cfg = setup["cfg"]
    n_backbone = len(model_lib.build_backbone(cfg).weights)
    for algo, expected in (("dp_fedemb", n_backbone), ("dp_fedavg", n_backbone + 1)):
        spec = federated.ProcessSpec(cfg, TrainConfig(algorithm=algo), PrivacyConfig(), 6)
        weights_type = federated.initial_weights_fn(spec).type_signature.result
        assert len(weights_type.trainable) == expected
    # Fine-tuning only the last layer: the rest is frozen (not aggregated).
    spec = federated.ProcessSpec(cfg, TrainConfig(train_last_layers=1), PrivacyConfig(), 6)
    wt = federated.initial_weights_fn(spec).type_signature.result
    assert len(wt.trainable) == 2 and len(wt.non_trainable) == n_backbone - 2


def _aggregate(factory, values):
    agg = factory.create(tff.TensorType(np.float32, [len(values[0])]))
    return np.asarray(agg.next(agg.initialize(), values).result)


def test_one_client_moves_the_aggregate_by_at_most_the_sensitivity():
    clip, m = 1.0, 4
    f = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(0.0, m, clip)
    others = [np.full(8, 0.1, np.float32)] * 3
    huge = np.full(8, 1e6, np.float32)
    with_u = _aggregate(f, others + [huge])
    without_u = _aggregate(f, others)
    # Add/remove one client (k = 1): the sum moves by at most C.
    assert np.linalg.norm(with_u - without_u) * m == pytest.approx(clip, rel=1e-5)
    # k > 1: one user changes (not removes) its virtual client's delta; the worst case flips a
    # clipped delta, moving the sum by 2C: the sensitivity the accountant uses for k > 1.
    flipped = _aggregate(f, others + [-huge])
    assert np.linalg.norm(with_u - flipped) * m == pytest.approx(2 * clip, rel=1e-5)
    mech = privacy.Mechanism("gaussian_fixed", 1.0, clip, "poisson", 100, m, 2, 10, 1e-5, "pld")
    assert mech.accountant_noise_multiplier == 0.5  # z C / (2 C)


def test_noise_std_matches_z_c_over_denominator():
    z, clip, m = 2.0, 1.0, 4
    f = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(z, m, clip)
    agg = _aggregate(f, [np.zeros(20_000, np.float32)])
    assert agg.std() == pytest.approx(z * clip / m, rel=0.03)
    again = _aggregate(f, [np.zeros(20_000, np.float32)])
    assert not np.allclose(agg, again)  # unseeded: noise is not reproducible


NOISE_OFF = dict(noise_multiplier=0.0, clients_per_round=4, clip_norm=10.0)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """A non-private 6-round run, never interrupted: the reference for resume tests."""
    return _run(setup, "np_full", TrainConfig(**FAST), PrivacyConfig(**NOISE_OFF))


def test_non_private_run_and_resume_gives_identical_weights(setup, uninterrupted):
    tcfg = TrainConfig(**FAST)
    pcfg = PrivacyConfig(**NOISE_OFF)
    full, rec = uninterrupted
    assert rec["epsilon"] == "inf" and rec["private"] is False and rec["rounds"] == 6
    metrics = json.load(open(os.path.join(full, "metrics.json")))
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in metrics["rounds"] if r["loss"] is not None]
    assert losses and all(np.isfinite(losses))
    assert not np.allclose(_weights(full)[0], _weights(setup["init"])[0])  # it trained
    # Interrupted after 3 rounds (checkpoint at 2), then resumed: round 3 is redone once.
    out = str(setup["dir"] / "np_resumed")
    assert train.run_training(setup["part"], setup["init"], out, tcfg, pcfg,
                              checkpoint_dir=out + "-ckpt", stop_after=3) == {}
    assert not os.path.exists(out)
    os.makedirs(out + "-ckpt/staging-deadbeef/round_9")  # debris of a kill mid-save: ignored
    _, rec2 = _run(setup, "np_resumed", tcfg, pcfg)
    assert rec2["rounds"] == 6
    for a, b in zip(_weights(full), _weights(out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    resumed_rounds = json.load(open(os.path.join(out, "metrics.json")))["rounds"]
    assert [r["round"] for r in resumed_rounds] == [1, 2, 3, 4, 5, 6]


def test_private_run_ledger_matches_the_accountant_and_survives_resume(setup):
    tcfg = TrainConfig(**{**FAST, "rounds": 3, "checkpoint_every": 1})
    pcfg = PrivacyConfig(noise_multiplier=1.0, clients_per_round=4, delta=1e-3)
    out = str(setup["dir"] / "dp")
    train.run_training(setup["part"], setup["init"], out, tcfg, pcfg,
                       checkpoint_dir=out + "-ckpt", stop_after=1)
    _, rec = _run(setup, "dp", tcfg, pcfg)
    mech = privacy.Mechanism("gaussian_fixed", 1.0, pcfg.clip_norm, "poisson", 12, 4, 1, 3,
                             1e-3, "pld")
    assert rec["rounds"] == 3 and rec["epsilon"] == pytest.approx(privacy.epsilon(mech))
    assert rec["neighboring_relation"] == privacy.ADD_REMOVE_USER
    assert rec["aggregator_dp_event"] == "GaussianDpEvent(noise_multiplier=1.0)"
    assert rec["num_users"] == 12 and rec["num_clients"] == 12
    saved = json.load(open(os.path.join(out, "privacy.json")))
    assert saved == rec
    eps = [r["epsilon"] for r in json.load(open(os.path.join(out, "metrics.json")))["rounds"]]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(rec["epsilon"])


def test_budget_stops_before_the_round_that_would_exceed_it(setup):
    tcfg = TrainConfig(**{**FAST, "rounds": 50, "algorithm": "dp_fedavg"})
    mech = privacy.Mechanism("gaussian_fixed", 1.0, 0.5, "poisson", 12, 4, 1, 50, 1e-3, "pld")
    budget = (privacy.epsilon(mech, 2) + privacy.epsilon(mech, 3)) / 2
    pcfg = PrivacyConfig(noise_multiplier=1.0, clients_per_round=4, delta=1e-3,
                         epsilon_budget=budget)
    _, rec = _run(setup, "budget", tcfg, pcfg)
    assert rec["rounds"] == 2 and rec["stopped_by_budget"] is True
    assert rec["epsilon"] <= budget


def test_finetune_phase_composes_with_training(setup, tmp_path):
    prior = {"phases": [{"phase": "train", **privacy.Mechanism(
        "gaussian_fixed", 1.0, 0.5, "poisson", 12, 4, 1, 3, 1e-3, "pld").to_dict(),
        "rounds_run": 3}]}
    tcfg = TrainConfig(**{**FAST, "rounds": 1, "train_last_layers": 1})
    pcfg = PrivacyConfig(noise_multiplier=1.0, clients_per_round=4, delta=1e-3)
    out, rec = _run(setup, "ft", tcfg, pcfg, phase="finetune", prior=prior)
    assert [p["phase"] for p in rec["phases"]] == ["train", "finetune"]
    m = privacy.Mechanism("gaussian_fixed", 1.0, 0.5, "poisson", 12, 4, 1, 3, 1e-3, "pld")
    assert rec["epsilon"] == pytest.approx(privacy.epsilon_of([(m, 3), (m, 1)], 1e-3))
    assert rec["rounds"] == 4
    w0, w1 = _weights(setup["init"]), _weights(out)
    assert np.array_equal(w0[0], w1[0]) and not np.array_equal(w0[-1], w1[-1])  # frozen early


def test_no_worker_process_is_left_behind(setup):
    train.stop_tff_workers()
    import psutil
    assert not [c for c in psutil.Process().children(recursive=True)
                if "worker_binary" in " ".join(c.cmdline())]


def test_sigkill_three_times_then_resume_matches_the_uninterrupted_run(setup, uninterrupted):
    """The training CLI killed with SIGKILL (whole process group, TFF worker included) at a
    random moment after it reports its first round, three times; each restart resumes from its
    last complete checkpoint (a kill may land before, during or after a checkpoint write)."""
    import random
    import signal
    import subprocess
    import sys
    import time
    full, rec = uninterrupted
    out = str(setup["dir"] / "killed")
    argv = [sys.executable, "-m", "dpfedemb.train", "--clients", setup["part"],
            "--init", setup["init"], "--output", out, "--checkpoint-dir", out + "-ckpt",
            "--rounds", "6", "--batch-size", "8", "--max-examples-per-client", "16",
            "--checkpoint-every", "1", "--seed", "1", "--noise-multiplier", "0",
            "--clients-per-round", "4", "--clip-norm", "10"]
    delays = random.Random(7)
    killed_at = []
    for attempt in range(4):
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        for line in proc.stderr:
            if attempt < 3 and " round " in line and "/6 clients" in line:
                killed_at.append(int(line.split(" round ")[1].split("/")[0]))
                time.sleep(delays.uniform(0.0, 0.6))
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=180)
        if attempt < 3:
            assert proc.returncode == -signal.SIGKILL
            assert not os.path.exists(os.path.join(out, "weights.npz"))
    assert proc.returncode == 0, "the final resume must finish"
    assert len(killed_at) == 3 and max(killed_at) <= 3
    again = json.load(open(os.path.join(out, "privacy.json")))
    assert again["rounds"] == rec["rounds"] == 6 and again["epsilon"] == rec["epsilon"]
    rounds = [r["round"] for r in json.load(open(os.path.join(out, "metrics.json")))["rounds"]]
    assert rounds == [1, 2, 3, 4, 5, 6]
    for a, b in zip(_weights(full), _weights(out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_lifetime_budget_refuses_before_any_round_and_records_once(setup, tmp_path):
    from dpfedemb import ledger
    from dpfedemb.config import LifetimeConfig
    uri = str(tmp_path / "ledger.json")
    tcfg = TrainConfig(**{**FAST, "rounds": 2})
    pcfg = PrivacyConfig(noise_multiplier=1.0, clients_per_round=4, delta=1e-3)
    life = LifetimeConfig(ledger_uri=uri, population_id="pop", budget=1e9, run_id="run-1")
    out, rec = _run(setup, "life1", tcfg, pcfg, lifetime=life)
    assert rec["lifetime"]["entries"] == 1
    assert rec["lifetime"]["lifetime_epsilon"] == pytest.approx(rec["epsilon"])
    spent = rec["epsilon"]
    before = open(uri, "rb").read()
    tight = LifetimeConfig(ledger_uri=uri, population_id="pop", budget=spent * 1.01, run_id="run-2")
    with pytest.raises(ledger.LifetimeBudgetExceeded) as e:
        _run(setup, "life2", tcfg, pcfg, lifetime=tight)
    assert f"{spent:.3f}"[:4] in str(e.value) and "pop" in str(e.value)
    assert open(uri, "rb").read() == before  # refusing spent nothing
    assert not os.path.exists(str(setup["dir"] / "life2"))


def test_worker_restarts_mid_run_change_nothing(setup, uninterrupted, monkeypatch):
    """TFF's worker is restarted when its memory passes a limit (it leaks per round); with the
    limit at 0 it restarts after every round and the run still equals the uninterrupted one."""
    monkeypatch.setattr(train, "WORKER_RSS_LIMIT", 0)
    full, rec = uninterrupted
    out, again = _run(setup, "restarts", TrainConfig(**FAST), PrivacyConfig(**NOISE_OFF))
    assert again["rounds"] == rec["rounds"]
    for a, b in zip(_weights(full), _weights(out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
