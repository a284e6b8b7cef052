"""Retrieval and verification metrics, bootstrap intervals, and the evaluation CLI end to end."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from itertools import combinations

import numpy as np
import pytest

from dpfedemb import evaluate as ev
from dpfedemb.data import records, schema


def clustered(n_classes: int = 8, per_class: int = 12, dim: int = 16, noise: float = 0.8,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    return rng.normal(size=(n_classes, dim))[labels] + noise * rng.normal(size=(len(labels), dim)), labels


def brute_force(emb: np.ndarray, labels: np.ndarray, far: float) -> tuple[float, float]:
    """Reference TAR and threshold by enumerating every pair."""
    e = ev.l2_normalize(emb)
    gen, imp = [], []
    for i, j in combinations(range(len(e)), 2):
        (gen if labels[i] == labels[j] else imp).append(float(e[i] @ e[j]))
    imp = np.sort(np.asarray(imp))[::-1]
    k = int(np.floor(far * len(imp) + 1e-9))
    thr = imp[k]  # at most k impostors strictly above
    return float(np.mean(np.asarray(gen) > thr)), float(thr)


def test_recall_ties_are_misses_and_single_image_classes_excluded():
    # a and b are class 0; c (class 1) is alone. For a, b and c are equally similar (0): a tie -> miss
    # (the lowest-index rule would have called it a hit). For b, a (0) beats c (-1): a hit.
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = np.array([0, 0, 1])
    assert ev.recall_at_1(emb, labels) == (0.5, 2)
    hit, usable = ev.recall_hits(emb, labels)
    assert hit.tolist() == [False, True, False] and usable.tolist() == [True, True, False]


def test_recall_known_answer_and_chunking():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.3]], np.float32)
    labels = np.array([0, 0, 1, 1, 1])  # the last is nearest to class 0 -> one miss out of five
    for chunk in (1, 2, 1024):
        assert ev.recall_at_1(emb, labels, chunk=chunk) == (0.8, 5)
    assert np.isnan(ev.recall_at_1(emb, np.arange(5))[0])  # no usable query


def test_far_threshold_known_answer():
    imp = np.linspace(0.1, 1.0, 10)
    assert ev.far_threshold(imp, 0.1) == pytest.approx(0.9)   # one impostor (1.0) above
    assert ev.far_threshold(imp, 1e-3) == pytest.approx(1.0)  # none above: unresolved
    assert np.isnan(ev.far_threshold(np.zeros(0), 0.1))


def test_tar_matches_brute_force_and_small_set_is_unresolved():
    emb, labels = clustered(5, 10)
    protocol = ev.Protocol(bootstrap_resamples=20)
    plan = ev.plan_subset("all", labels, np.ones(len(labels), bool), protocol)
    m = ev.subset_metrics(emb, plan, protocol)
    assert m["genuine_pairs"] == 5 * 45 and m["impostor_pairs_used"] == m["impostor_pairs_total"] == 1000
    for far in (1e-3, 1e-1):
        tar, thr = brute_force(emb, labels, far)
        got = m["tar_at_far"][ev.far_key(far)]
        assert got["tar"] == pytest.approx(tar) and got["threshold"] == pytest.approx(thr, abs=1e-6)
        assert got["achieved_far"] <= far
    assert m["tar_at_far"]["0.001"]["resolved"] is True  # 1000 impostors: exactly 1/FAR
    two = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    small = ev.subset_metrics(two, ev.plan_subset("all", np.array([0, 0, 1, 1]), np.ones(4, bool),
                                                  protocol), protocol)
    assert small["tar_at_far"]["0.1"] == pytest.approx(
        {"tar": 1.0, "ci": [1.0, 1.0], "threshold": 0.0, "achieved_far": 0.0, "resolved": False})


def test_impostor_sampling_is_capped_distinct_seeded():
    labels = np.repeat(np.arange(4), 30)
    i, j, total = ev.impostor_pairs(labels, 500, np.random.default_rng(1))
    assert total == 120 * 119 // 2 - 4 * 435 and len(i) == 500
    assert (i < j).all() and (labels[i] != labels[j]).all()
    assert len(set(zip(i.tolist(), j.tolist()))) == 500
    i2, j2, _ = ev.impostor_pairs(labels, 500, np.random.default_rng(1))
    assert np.array_equal(i, i2) and np.array_equal(j, j2)
    ia, ja, _ = ev.impostor_pairs(labels, total, np.random.default_rng(1))  # all of them
    assert len(ia) == total and (labels[ia] != labels[ja]).all()


def test_bootstrap_identity_resample_reproduces_point_estimates():
    emb, labels = clustered(6, 10)
    protocol = ev.Protocol(bootstrap_resamples=5)
    plan = ev.plan_subset("all", labels, np.ones(len(labels), bool), protocol)
    e = ev.l2_normalize(emb)
    hit, usable = ev.recall_hits(e, plan.cls)
    ones = np.ones((1, 6), np.int64)
    assert ev.bootstrap_recall(hit, usable, plan.cls, ones)[0] == pytest.approx(hit.mean())
    imp = ev.pair_similarities(e, plan.imp_i, plan.imp_j)
    thr = [ev.far_threshold(imp, 0.1)]
    gen_hist, above = ev.genuine_stats(e, plan.cls, thr)
    binned = ev.bootstrap_tar(gen_hist, plan.cls[plan.imp_i], plan.cls[plan.imp_j],
                              ev.to_bins(imp), [0.1], ones)[0, 0]
    assert binned == pytest.approx(above[0] / gen_hist.sum(), abs=0.03)  # bin resolution only


def test_bootstrap_intervals_contain_point_estimates_and_are_seeded():
    emb, labels = clustered(10, 15, noise=1.5)
    protocol = ev.Protocol(bootstrap_resamples=100, seed=3)
    plan = ev.plan_subset("all", labels, np.ones(len(labels), bool), protocol)
    m = ev.subset_metrics(emb, plan, protocol)
    lo, hi = m["recall_at_1_ci"]
    assert lo <= m["recall_at_1"] <= hi and hi - lo > 0
    for t in m["tar_at_far"].values():
        assert t["ci"][0] <= t["tar"] <= t["ci"][1]
    again = ev.subset_metrics(emb, ev.plan_subset("all", labels, np.ones(len(labels), bool),
                                                  protocol), protocol)
    assert again["recall_at_1_ci"] == m["recall_at_1_ci"]


def test_subset_masks_notes():
    labels = np.array([0, 0, 1, 1])
    masks, info = ev.subset_masks(labels, [0, 1, 5])
    assert set(masks) == {"all", "seen"} and info["unseen"]["available"] is False
    assert "every evaluation class was seen" in info["unseen"]["note"]
    masks, info = ev.subset_masks(labels, None)
    assert set(masks) == {"all"} and "unknown" in info["seen"]["note"]
    masks, info = ev.subset_masks(labels, [1])
    assert masks["unseen"].tolist() == [True, True, False, False] and info["seen"]["classes"] == [1]


def test_embed_failure_names_the_model_path(monkeypatch):
    from dpfedemb import model as model_lib
    from dpfedemb.config import ImageSpec

    class Broken:
        image_spec = ImageSpec(28, 28, 3)

        def embed(self, images, batch_size=256):
            raise ValueError("incompatible input shape")

    monkeypatch.setattr(model_lib, "load_embedder", lambda path: Broken())
    with pytest.raises(ev.EvaluationError, match="/models/broken.*incompatible input shape"):
        ev.embed_with_model("b", "/models/broken", lambda spec: np.zeros((2, 28, 28, 3), np.uint8))


# ------------------------------------------------------------------------------ CLI end to end

@pytest.fixture(scope="module")
def eval_set(tmp_path_factory, tiny_images):
    """72 images of 6 classes plus one single-image class (6), as TFRecords."""
    images, labels = tiny_images
    keep = np.concatenate([np.nonzero(labels == c)[0][:12] for c in range(6)] + [[0]])
    labels = np.concatenate([labels[keep[:-1]], [6]])
    d = tmp_path_factory.mktemp("eval")
    recs = [schema.make_example(schema.encode_image(im), int(lab), b"u%d" % i)
            for i, (im, lab) in enumerate(zip(images[keep], labels))]
    records.write_shards(recs, str(d), "eval", 2)
    return str(d / "eval-*.tfrecord")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from dpfedemb import model as model_lib
    from dpfedemb.config import ModelConfig

    cfg = ModelConfig(embedding_dim=8, seed=1)
    path = str(tmp_path_factory.mktemp("models") / "trained")
    model_lib.save_backbone(model_lib.build_backbone(cfg), cfg, path)
    return path


def test_cli_end_to_end(tmp_path, eval_set, saved_model, capsys):
    privacy = {"epsilon": 4.5, "delta": 1e-6, "noise_multiplier": 1.1, "clip_norm": 0.5,
               "accountant": "pld", "neighboring_relation": "replace_one",
               "phases": [{"name": "train", "epsilon": 4.0, "delta": 5e-7}]}
    (tmp_path / "privacy.json").write_text(json.dumps(privacy))
    (tmp_path / "stats.json").write_text(json.dumps({"users": 10, "virtual_clients": 5}))
    (tmp_path / "train.json").write_text(json.dumps({"rounds": [{"round": 1, "loss": 2.0},
                                                                {"round": 2, "loss": 1.5}]}))
    out = tmp_path / "out"
    rc = ev.main(["--data", eval_set, "--model", f"trained={saved_model}", "--output", str(out),
                  "--train-classes", "0,1,2", "--privacy", str(tmp_path / "privacy.json"),
                  "--partition-stats", str(tmp_path / "stats.json"),
                  "--training-metrics", str(tmp_path / "train.json"), "--bootstrap-resamples", "20"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_order"] == ["raw_pixels", "trained"]
    assert metrics["privacy"] == privacy
    for name in metrics["model_order"]:
        subsets = metrics["models"][name]["subsets"]
        assert set(subsets) == {"all", "seen", "unseen"}
        assert subsets["all"]["examples"] == 73 and subsets["all"]["excluded_queries"] == 1
        assert subsets["all"]["single_image_classes"] == 1
        assert subsets["seen"]["classes"] == 3 and subsets["unseen"]["classes"] == 4
        assert set(subsets["all"]["tar_at_far"]) == {"0.001", "0.1"}
    assert metrics["models"]["trained"]["embedding_dim"] == 8
    parser = HTMLParser()
    parser.feed((out / "report.html").read_text())
    md = (out / "report.md").read_text()
    assert "raw_pixels" in md and "trained" in md and "replace_one" in md


def test_cli_missing_model_dir_names_the_path(tmp_path, eval_set, capsys):
    missing = str(tmp_path / "no-such-model")
    rc = ev.main(["--data", eval_set, "--model", f"trained={missing}", "--output",
                  str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and missing in err and "trained" in err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_arguments(tmp_path, eval_set):
    with pytest.raises(SystemExit):
        ev.main(["--data", eval_set, "--model", "no-equals-sign", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        ev.main(["--data", eval_set, "--output", str(tmp_path), "--train-classes", "a,b"])


def test_card_gives_seen_classes_and_image_spec(tmp_path):
    card = {"image": {"height": 32, "width": 32, "channels": 3},
            "splits": {"private": {"classes": [3, 1]}, "eval": {"classes": [1, 3, 7]}}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    classes, spec = ev.card_info(str(tmp_path / "card.json"))
    assert classes == [3, 1] and (spec.height, spec.channels) == (32, 3)
    (tmp_path / "bad.json").write_text(json.dumps({"splits": {"eval": {}}}))
    with pytest.raises(ev.EvaluationError, match="bad.json has no splits.private.classes"):
        ev.card_info(str(tmp_path / "bad.json"))
