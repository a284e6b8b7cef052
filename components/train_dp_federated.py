"""train_dp_federated: DP-FedEmb rounds on TFF (runs on a GPU node in production)."""
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def train_dp_federated(params_json: str, pipeline_job: str, partitions: Input[Dataset],
                       init_model: Input[Model],
                       model: Output[Model], privacy_ledger: Output[Artifact],
                       metrics: Output[Metrics]) -> None:
    """User-level DP federated training; writes the backbone and the privacy ledger."""
    import json

    from dpfedemb import steps

    result = steps.train_phase("train", json.loads(params_json), partitions.path, init_model.path,
                               model.path, privacy_ledger.path, prior_ledger=None,
                               pipeline_job=pipeline_job)
    for artifact in (model, privacy_ledger):
        artifact.metadata.update(result["metadata"])
    for k, v in result["metrics"].items():
        metrics.log_metric(k, v)
