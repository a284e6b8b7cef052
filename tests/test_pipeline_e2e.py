"""One end-to-end run of the real local pipeline on tiny data (the only full run in the suite)."""
import json
import os

import numpy as np
import psutil
import pytest

from dpfedemb import privacy
from dpfedemb.config import SimulationConfig
from dpfedemb.data import importers
from pipeline import audit, local_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(8), 40)
    x = rng.integers(0, 60, (len(y), 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 3 * c:3 * c + 4, :] = 220
    users = np.asarray([b"secret-person-%03d" % (i % 40) for i in range(len(y))], object)
    importers.import_arrays(x, y, users, str(d / "data"), SimulationConfig(), source="test",
                            licence="test", holdout_classes=[7], eval_fraction=0.2,
                            public_fraction=0.2)
    from pipeline.__main__ import _params
    params = _params([("rounds", 2), ("clients_per_round", 4), ("pretrain_epochs", 1),
                      ("finetune_rounds", 1), ("eval_bootstrap_resamples", 10),
                      ("embedding_dim", 16), ("max_examples_per_client", 16),
                      ("ledger_uri", str(d / "ledger.json")), ("population_id", "test-pop"),
                      ("lifetime_epsilon_budget", 1e6)])
    key = "e2e-known-pseudonym-key-0123456789"
    log = d / "run.log"
    # Every log line of the run (ours, TFF's, Beam's, KFP's subprocesses) lands in run.log.
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT)
    os.dup2(fd, 1), os.dup2(fd, 2)
    old = os.environ.get("DPFEDEMB_PSEUDONYM_KEY")
    os.environ["DPFEDEMB_PSEUDONYM_KEY"] = key
    import contextlib
    import sys
    try:
        with open(log, "a", buffering=1) as py_log, contextlib.redirect_stdout(py_log), \
                contextlib.redirect_stderr(py_log):
            import logging
            handler = logging.StreamHandler(py_log)
            logging.getLogger().addHandler(handler)
            try:
                summary = local_run.run(str(d / "data"), "/nonexistent", str(d / "runs"), params)
            finally:
                logging.getLogger().removeHandler(handler)
                sys.stdout.flush()
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(fd)
        if old is None:
            del os.environ["DPFEDEMB_PSEUDONYM_KEY"]
        else:
            os.environ["DPFEDEMB_PSEUDONYM_KEY"] = old
    return {"summary": summary, "users": set(users), "dir": d, "key": key.encode(), "log": log}


def test_run_ends_with_a_consistent_summary(run):
    s = run["summary"]
    assert s["consistent"] is True
    assert isinstance(s["epsilon"], float) and s["epsilon"] > 0 and s["delta"] == 1e-5
    assert set(s["recall_at_1"]) == {"raw_pixels", "pretrained", "trained", "finetuned"}
    assert all(0 <= v <= 1 for v in s["recall_at_1"].values())
    text = local_run.format_summary(s)
    assert "epsilon" in text and "recall@1 trained" in text and s["report_html"] in text


def test_every_artifact_exists_and_carries_the_privacy_keys(run):
    lineage = json.load(open(os.path.join(run["summary"]["run_dir"], "lineage.json")))
    arts = {(a["task"], a["output"]): a for a in lineage["artifacts"] if "uri" in a}
    for key in [("partition-users", "partitions"), ("pretrain-public", "model"),
                ("train-dp-federated", "model"), ("train-dp-federated", "privacy_ledger"),
                ("finetune", "model"), ("finetune", "privacy_ledger"), ("evaluate", "evaluation"),
                ("evaluate", "report_md"), ("evaluate", "report_html")]:
        assert os.path.exists(arts[key]["uri"]), key
    # Metrics artifacts live in their metadata (log_metric), not in files.
    assert arts[("evaluate", "metrics")]["metadata"]["recall_at_1_trained"] >= 0
    assert arts[("train-dp-federated", "metrics")]["metadata"]["epsilon"] > 0
    for key in [("train-dp-federated", "model"), ("finetune", "privacy_ledger"),
                ("evaluate", "report_html"), ("evaluate", "evaluation")]:
        assert set(privacy.PRIVACY_KEYS) <= set(arts[key]["metadata"]), key
    meta = arts[("evaluate", "evaluation")]["metadata"]
    assert meta["epsilon"] == pytest.approx(run["summary"]["epsilon"])
    assert {"recall_at_1_trained", "recall_at_1_pretrained"} <= set(meta)
    ledger = json.load(open(arts[("finetune", "privacy_ledger")]["uri"]))
    assert [p["phase"] for p in ledger["phases"]] == ["train", "finetune"] and ledger["rounds"] == 3
    html = open(arts[("evaluate", "report_html")]["uri"]).read()
    assert all(k in html for k in privacy.PRIVACY_KEYS)


def test_audit_reads_the_same_numbers(run):
    report = audit.audit(run["summary"]["run_dir"])
    assert report["consistent"], report["problems"]
    from dpfedemb import ledger
    doc = ledger.read(str(run["dir"] / "ledger.json"), "test-pop")
    assert [e["phase"] for e in doc["entries"]] == ["train", "finetune"]
    assert ledger.lifetime_epsilon(doc["entries"], doc["delta"]) == pytest.approx(
        run["summary"]["epsilon"])
    assert report["chain"][-1]["population_id"] == "test-pop"
    assert report["privacy"]["epsilon"] == run["summary"]["epsilon"]
    assert report["parameters"]["rounds"] == 2


def test_no_raw_user_id_and_no_key_in_any_artifact_report_log_or_ledger(run):
    needles = [u for u in run["users"]] + [b"secret-person", run["key"]]
    files = [os.path.join(dirpath, name) for dirpath, _, names in
             os.walk(run["summary"]["run_dir"]) for name in names]
    files += [str(run["log"]), str(run["dir"] / "ledger.json")]
    assert len(files) > 20
    for path in files:
        data = open(path, "rb").read()
        assert not any(n in data for n in needles), path
    assert b"round 2/2" in open(run["log"], "rb").read()  # the log was really captured


def test_no_tff_worker_left_behind(run):
    assert not [c for c in psutil.Process().children(recursive=True)
                if "worker_binary" in " ".join(c.cmdline())]
