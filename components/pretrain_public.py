"""pretrain_public: centralized, non-private pretraining on the public split."""
from kfp.dsl import Metrics, Model, Output


def pretrain_public(data_dir: str, params_json: str, model: Output[Model],
                    metrics: Output[Metrics]) -> None:
    """Train the backbone on public data without DP (no privacy cost)."""
    import json

    from dpfedemb import steps

    result = steps.pretrain(data_dir, model.path, json.loads(params_json))
    model.metadata.update(result["metadata"])
    for k, v in result["metrics"].items():
        metrics.log_metric(k, v)
