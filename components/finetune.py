"""finetune: the second private phase, composed with training through the ledger."""
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def finetune(params_json: str, pipeline_job: str, partitions: Input[Dataset],
             init_model: Input[Model],
             prior_ledger: Input[Artifact], model: Output[Model], privacy_ledger: Output[Artifact],
             metrics: Output[Metrics]) -> None:
    """Private fine-tuning; zero rounds passes the trained model and ledger through unchanged."""
    import json

    from dpfedemb import steps

    result = steps.train_phase("finetune", json.loads(params_json), partitions.path,
                               init_model.path, model.path, privacy_ledger.path,
                               prior_ledger=prior_ledger.path, pipeline_job=pipeline_job)
    for artifact in (model, privacy_ledger):
        artifact.metadata.update(result["metadata"])
    for k, v in result["metrics"].items():
        metrics.log_metric(k, v)
