"""What each pipeline step does, on plain paths: the KFP components are thin wrappers over these.

Each step returns ``{"metadata": {...}, "metrics": {...}}``: metadata goes on the step's output
artifacts (privacy keys named as in :data:`dpfedemb.privacy.PRIVACY_KEYS`, everywhere), metrics
(numbers only) are logged on its Metrics artifact.
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Any, Mapping, Optional

from dpfedemb import privacy, storage
from dpfedemb.config import ImageSpec, PipelineParams, as_dict, from_mapping

CARD = "card.json"


def params_of(params: Mapping[str, Any]) -> PipelineParams:
    """Validated pipeline parameters (ConfigError names the bad one)."""
    return from_mapping(PipelineParams, dict(params))


def validate_parameters(params: Mapping[str, Any]) -> PipelineParams:
    return params_of(params)


def _card(data_dir: str) -> dict:
    path = storage.join(data_dir, CARD)
    if not storage.exists(path):
        raise storage.StorageError(f"{path} not found: data_dir must be an imported data set "
                                   "(python -m dpfedemb.data import ...)")
    return storage.read_json(path)


def _split_glob(data_dir: str, split: str) -> str:
    return storage.join(data_dir, f"{split}-*.tfrecord")


def _numbers(d: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a dict (KFP metrics take numbers only)."""
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def partition(data_dir: str, output: str, params: Mapping[str, Any],
              pseudonym_key_file: str) -> dict:
    from dpfedemb import partition as partition_lib

    p = params_of(params)
    card = _card(data_dir)
    stats = partition_lib.run_partition(_split_glob(data_dir, "private"), output, p.partition(),
                                        partition_lib.resolve_key(pseudonym_key_file or None,
                                                                  False, os.environ))
    meta = {"data_dir": data_dir, "data_sha256": card["splits"]["private"]["sha256"],
            "source": card.get("source"), "stats": stats}
    keys = ("records_in", "examples_kept", "dead_lettered", "users", "users_dropped",
            "virtual_clients", "classes", "examples_over_cap")
    return {"metadata": meta, "metrics": _numbers({k: stats.get(k) for k in keys})}


def pretrain(data_dir: str, output: str, params: Mapping[str, Any]) -> dict:
    from dpfedemb import pretrain as pretrain_lib

    p = params_of(params)
    card = _card(data_dir)
    image = ImageSpec(**card["image"])
    metrics = pretrain_lib.run_pretrain(_split_glob(data_dir, "public"), output, p.model(image),
                                        p.pretrain())
    meta = {"data_dir": data_dir, "data_sha256": metrics["data_sha256"], "private": False,
            "params": metrics["params"], "model": metrics["model"]}
    return {"metadata": meta,
            "metrics": _numbers({"final_loss": (metrics["loss"] or [math.nan])[-1],
                                 "final_accuracy": (metrics["accuracy"] or [math.nan])[-1],
                                 "examples": metrics["examples"], "epochs": metrics["epochs"]})}


def _copy_model(src: str, dst: str) -> None:
    stage = storage.staging_dir(dst)
    shutil.copytree(src, stage)
    storage.remove_tree(storage.join(stage, storage.COMPLETE_MARKER))
    storage.publish_dir(stage, dst)


def train_phase(phase: str, params: Mapping[str, Any], partitions: str, init_model: str,
                output: str, ledger_path: str, prior_ledger: Optional[str],
                pipeline_job: str = "") -> dict:
    """A private phase ('train' or 'finetune'); writes the model and the composed ledger, and
    checks and records the population's lifetime ledger when one is configured."""
    from dpfedemb import train as train_lib

    p = params_of(params)
    train_cfg, priv_cfg = p.train_phase(phase)
    prior = storage.read_json(prior_ledger) if prior_ledger else None
    if train_cfg.rounds == 0 and prior is not None:
        # Zero rounds skips the phase cleanly: same model, same ledger, nothing spent.
        _copy_model(init_model, output)
        record = dict(prior, skipped_phase=phase)
    else:
        record = train_lib.run_training(partitions, init_model, output, train_cfg, priv_cfg,
                                        phase=phase, prior=prior,
                                        checkpoint_dir=f"{output.rstrip('/')}-checkpoints",
                                        lifetime=p.lifetime(pipeline_job or "manual", pipeline_job))
        storage.remove_tree(f"{output.rstrip('/')}-checkpoints")  # secrets: gone once done
    storage.write_json_atomic(ledger_path, record)
    meta = {"phase": phase, **privacy.privacy_metadata(record),
            "train_params": as_dict(train_cfg), "privacy_params": as_dict(priv_cfg)}
    last = {}
    metrics_path = storage.join(output, "metrics.json")
    if storage.exists(metrics_path):
        rounds = storage.read_json(metrics_path).get("rounds", [])
        last = rounds[-1] if rounds else {}
    return {"metadata": meta,
            "metrics": _numbers({**{k: record.get(k) for k in privacy.PRIVACY_KEYS},
                                 "private": 1.0 if record.get("private") else 0.0,
                                 "final_loss": last.get("loss")})}


def evaluate(data_dir: str, params: Mapping[str, Any], partitions: str, models: Mapping[str, str],
             ledger_path: str, output_dir: str, report_md: str, report_html: str) -> dict:
    """Evaluate the models on the eval split; copy the reports to the KFP report artifacts."""
    from dpfedemb import evaluate as evaluate_lib

    p = params_of(params)
    args = ["--data", _split_glob(data_dir, "eval"), "--output", output_dir,
            "--card", storage.join(data_dir, CARD), "--privacy", ledger_path,
            "--partition-stats", storage.join(partitions, "stats.json"),
            "--seed", str(p.eval_seed), "--bootstrap-resamples", str(p.eval_bootstrap_resamples)]
    phases = {"trained": "train", "finetuned": "finetune"}
    for name, path in models.items():
        args += ["--model", f"{name}={path}"]
        metrics_path = storage.join(path, "metrics.json")
        # A skipped fine-tuning phase passes the trained model through: its metrics.json is
        # training's, already plotted under "trained".
        if name in phases and storage.exists(metrics_path) and \
                storage.read_json(metrics_path).get("phase") == phases[name]:
            args += ["--training-metrics", f"{name}={metrics_path}"]
    if evaluate_lib.main(args) != 0:
        raise RuntimeError("evaluation failed: see the error above")
    shutil.copyfile(storage.join(output_dir, "report.md"), report_md)
    shutil.copyfile(storage.join(output_dir, "report.html"), report_html)
    metrics = storage.read_json(storage.join(output_dir, "metrics.json"))
    record = storage.read_json(ledger_path)
    flat = {}
    for name in ("raw_pixels", *models):
        row = metrics["models"].get(name, {}).get("subsets", {}).get("all", {})
        flat[f"recall_at_1_{name}"] = row.get("recall_at_1")
    meta = {**privacy.privacy_metadata(record), **{k: v for k, v in flat.items()}}
    return {"metadata": meta, "metrics": _numbers({**flat, **{
        k: record.get(k) for k in ("epsilon", "delta")}})}
