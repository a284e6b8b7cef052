"""Run the whole DAG locally: kfp.local SubprocessRunner in this environment, local paths.

The pseudonym key (``$DPFEDEMB_PSEUDONYM_KEY``, or else a fresh random run secret) is held in a
private temporary file that is deleted when the run ends; it never enters ``runs/``. After the run, ``lineage.json`` records the
parameters and every artifact (URI and metadata) for ``python -m pipeline audit``.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import tempfile
import time
from typing import Any

from dpfedemb import storage
from dpfedemb.config import SimulationConfig

log = logging.getLogger("pipeline.run")
LINEAGE = "lineage.json"


def ensure_data(data_dir: str, fashion_mnist_dir: str) -> dict:
    """The data set card, importing Fashion-MNIST (default data) when the folder is missing."""
    card = storage.join(data_dir, "card.json")
    if not storage.exists(card):
        from dpfedemb.data import importers
        log.info("importing Fashion-MNIST from %s into %s", fashion_mnist_dir, data_dir)
        importers.import_fashion_mnist(fashion_mnist_dir, data_dir, SimulationConfig())
    return storage.read_json(card)


def _artifacts(root: str) -> list[dict[str, Any]]:
    """Every output artifact kfp.local wrote under ``root``, with the metadata it recorded."""
    found = []
    for dirpath, _, files in os.walk(root):
        if "executor_output.json" not in files:
            continue
        out = json.load(open(os.path.join(dirpath, "executor_output.json")))
        task = os.path.basename(dirpath)
        for name, arts in out.get("artifacts", {}).items():
            for art in arts.get("artifacts", []):
                found.append({"task": task, "output": name, "uri": art.get("uri"),
                              "metadata": art.get("metadata", {})})
        for name, value in out.get("parameterValues", {}).items():
            found.append({"task": task, "output": name, "value": value})
    return sorted(found, key=lambda a: (a["task"], a["output"]))


def run(data_dir: str, fashion_mnist_dir: str, runs_dir: str, params: dict[str, Any]) -> dict:
    """Run the pipeline; returns the summary (also written to runs/<time>/summary.json)."""
    from kfp import local

    from pipeline import dag

    t0 = time.time()
    card = ensure_data(data_dir, fashion_mnist_dir)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = os.path.abspath(os.path.join(runs_dir, stamp))
    root = os.path.join(run_dir, "artifacts")
    os.makedirs(root)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root,
               raise_on_error=True)
    pipeline_fn = dag.build_pipeline(gpu=False)
    with tempfile.TemporaryDirectory(prefix="dpfedemb-secret-") as secret_dir:
        key_file = os.path.join(secret_dir, "pseudonym.key")
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(os.environ.get("DPFEDEMB_PSEUDONYM_KEY") or secrets.token_hex(32))
        pipeline_fn(data_dir=os.path.abspath(data_dir), pseudonym_key_file=key_file, **params)
    artifacts = _artifacts(root)
    lineage = {"pipeline": dag.PIPELINE_NAME, "run": stamp, "data_dir": os.path.abspath(data_dir),
               "data_card": {"source": card.get("source"),
                             "splits": {k: {"examples": v["examples"], "sha256": v["sha256"]}
                                        for k, v in card["splits"].items()},
                             "raw_pixel_recall_at_1": card.get("raw_pixel_recall_at_1")},
               "parameters": params, "artifacts": artifacts,
               "wall_seconds": time.time() - t0}
    storage.write_json_atomic(os.path.join(run_dir, LINEAGE), lineage)
    from pipeline import audit
    report = audit.audit(run_dir)
    summary = {"run_dir": run_dir, **report["summary"], "wall_seconds": time.time() - t0,
               "consistent": report["consistent"]}
    storage.write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    return summary


def format_summary(s: dict) -> str:
    eps = s.get("epsilon")
    eps_text = "infinite (not private)" if eps in ("inf", None) else f"{eps:.3f}"
    lines = ["", "dpfedemb run finished in %.0f s" % s["wall_seconds"],
             f"  privacy: epsilon {eps_text} at delta {s.get('delta')} "
             f"(unit: one user; {s.get('neighboring_relation')}; accountant {s.get('accountant')})"]
    for name, value in s.get("recall_at_1", {}).items():
        lines.append(f"  recall@1 {name:<11} {value:.4f}" if value is not None
                     else f"  recall@1 {name:<11} n/a")
    lines += [f"  report (HTML):     {s.get('report_html')}",
              f"  report (Markdown): {s.get('report_md')}",
              f"  lineage:           python -m pipeline audit {s['run_dir']}"]
    if not s.get("consistent"):
        lines.append("  WARNING: the audit found inconsistent numbers; see the audit output")
    return "\n".join(lines)
