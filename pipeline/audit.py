"""``python -m pipeline audit RUN``: the lineage of a run, read back from its artifacts.

Chain: input data fingerprint -> partition stats -> pretrained model -> trained and fine-tuned
models -> epsilon, delta and every DP parameter, with the pipeline parameters used. Every number
is read from the artifacts themselves and cross-checked: the ledger artifact, the artifacts'
metadata, the model's privacy.json and the evaluation's metrics.json must agree.

On Vertex AI the same facts live in Vertex ML Metadata: each artifact below is an ML Metadata
Artifact of the pipeline run's context with the same ``metadata`` keys (the privacy keys of
:data:`dpfedemb.privacy.PRIVACY_KEYS`), linked by Executions in the order shown; the Vertex
console's lineage graph or ``aiplatform.Artifact.list(filter=...)`` on those keys reads them.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from dpfedemb import privacy, storage

LINEAGE = "lineage.json"


def _find(arts: list[dict], task: str, output: str) -> Optional[dict]:
    for a in arts:
        if a["task"].startswith(task) and a["output"] == output:
            return a
    return None


def _path(art: Optional[dict]) -> Optional[str]:
    return art["uri"] if art and art.get("uri") else None


def _json(path: Optional[str], name: Optional[str] = None) -> Optional[dict]:
    if not path:
        return None
    full = os.path.join(path, name) if name else path
    return storage.read_json(full) if os.path.exists(full) else None


def audit(run_dir: str) -> dict[str, Any]:
    """Read the run's lineage and cross-check every privacy and utility number."""
    lineage = storage.read_json(os.path.join(run_dir, LINEAGE))
    arts = lineage["artifacts"]
    problems: list[str] = []
    part = _find(arts, "partition-users", "partitions")
    pre = _find(arts, "pretrain-public", "model")
    trn = _find(arts, "train-dp-federated", "model")
    trn_ledger = _find(arts, "train-dp-federated", "privacy_ledger")
    fin = _find(arts, "finetune", "model")
    fin_ledger = _find(arts, "finetune", "privacy_ledger")
    evaluation = _find(arts, "evaluate", "evaluation")
    for name, art in (("partition", part), ("pretrained model", pre), ("trained model", trn),
                      ("training ledger", trn_ledger), ("fine-tuned model", fin),
                      ("final ledger", fin_ledger), ("evaluation", evaluation)):
        if art is None or not art.get("uri") or not os.path.exists(art["uri"]):
            problems.append(f"{name}: artifact missing")
    stats = _json(_path(part), "stats.json") or {}
    ledger = _json(_path(fin_ledger)) or {}
    model_privacy = _json(_path(fin), "privacy.json") or _json(_path(trn), "privacy.json") or {}
    metrics = _json(_path(evaluation), "metrics.json") or {}
    card = lineage.get("data_card", {})
    private_sha = card.get("splits", {}).get("private", {}).get("sha256")
    if part and part["metadata"].get("data_sha256") != private_sha:
        problems.append("partition input fingerprint differs from the data card's private split")
    for key in privacy.PRIVACY_KEYS:
        values = {"ledger": ledger.get(key), "model privacy.json": model_privacy.get(key),
                  "ledger metadata": (fin_ledger or {}).get("metadata", {}).get(key),
                  "evaluation metrics.json": metrics.get("privacy", {}).get(key)}
        distinct = {repr(v) for v in values.values()}
        if len(distinct) > 1:
            problems.append(f"{key} disagrees: {values}")
    lifetime = ledger.get("lifetime")
    if lifetime:
        from dpfedemb import ledger as ledger_lib
        doc = ledger_lib.read(lifetime["ledger_uri"], lifetime["population_id"])
        mine = {e["phase"]: e for e in doc["entries"]
                if e["entry_id"].rsplit("/", 1)[0] == lifetime["entry_id"].rsplit("/", 1)[0]}
        for ph in ledger.get("phases", []):
            entry = mine.get(ph["phase"])
            if entry is None:
                problems.append(f"lifetime ledger {lifetime['ledger_uri']} lacks phase "
                                f"{ph['phase']} of this run")
            elif (entry["rounds_run"], entry["epsilon_of_phase"]) != (ph["rounds_run"],
                                                                       ph["epsilon"]):
                problems.append(f"lifetime ledger entry {entry['entry_id']} disagrees with the "
                                f"run's ledger: {entry['rounds_run']} rounds, epsilon "
                                f"{entry['epsilon_of_phase']} vs {ph['rounds_run']}, "
                                f"{ph['epsilon']}")
    recall = {name: m.get("subsets", {}).get("all", {}).get("recall_at_1")
              for name, m in metrics.get("models", {}).items()}
    chain = [
        {"step": "data", "data_dir": lineage.get("data_dir"), "private_sha256": private_sha,
         "splits": card.get("splits")},
        {"step": "partition", "uri": _path(part),
         "stats": {k: stats.get(k) for k in ("records_in", "examples_kept", "dead_lettered",
                                             "users", "users_dropped", "virtual_clients")}},
        {"step": "pretrain", "uri": _path(pre),
         "public_sha256": (pre or {}).get("metadata", {}).get("data_sha256")},
        {"step": "train", "uri": _path(trn), "ledger": _path(trn_ledger),
         "privacy": privacy.privacy_metadata(_json(_path(trn_ledger)) or {})},
        {"step": "finetune", "uri": _path(fin), "ledger": _path(fin_ledger),
         "phases": [{k: ph.get(k) for k in ("phase", "rounds_run", "noise_multiplier",
                                            "epsilon")} for ph in ledger.get("phases", [])]},
        {"step": "evaluate", "uri": _path(evaluation), "recall_at_1": recall},
        {"step": "lifetime ledger", **(lifetime or {"ledger_uri": None})},
    ]
    report_md = _find(arts, "evaluate", "report_md")
    report_html = _find(arts, "evaluate", "report_html")
    summary = {"epsilon": ledger.get("epsilon"), "delta": ledger.get("delta"),
               "neighboring_relation": ledger.get("neighboring_relation"),
               "accountant": ledger.get("accountant"), "recall_at_1": recall,
               "report_md": _path(report_md), "report_html": _path(report_html)}
    return {"run": run_dir, "parameters": lineage.get("parameters"), "chain": chain,
            "privacy": privacy.privacy_metadata(ledger), "summary": summary,
            "problems": problems, "consistent": not problems}


def format_audit(report: dict) -> str:
    lines = [f"run {report['run']}", "parameters:"]
    lines += [f"  {k} = {v}" for k, v in sorted((report.get("parameters") or {}).items())]
    for link in report["chain"]:
        lines.append(f"{link['step']}:")
        lines += [f"  {k}: {v}" for k, v in link.items() if k != "step"]
    lines.append("privacy (final, all phases composed):")
    lines += [f"  {k}: {v}" for k, v in report["privacy"].items()]
    lines.append("consistent: yes" if report["consistent"] else "INCONSISTENT:")
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)
