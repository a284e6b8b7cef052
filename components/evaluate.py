"""evaluate: retrieval recall and TAR@FAR for every model, plus the reports."""
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(data_dir: str, params_json: str, partitions: Input[Dataset],
             pretrained: Input[Model], trained: Input[Model], finetuned: Input[Model],
             privacy_ledger: Input[Artifact], metrics: Output[Metrics],
             evaluation: Output[Artifact], report_md: Output[Markdown],
             report_html: Output[HTML]) -> None:
    """Compare pretrained-only, DP-trained and fine-tuned models on held-out data."""
    import json

    from dpfedemb import steps

    result = steps.evaluate(data_dir, json.loads(params_json), partitions.path,
                            {"pretrained": pretrained.path, "trained": trained.path,
                             "finetuned": finetuned.path},
                            privacy_ledger.path, evaluation.path, report_md.path, report_html.path)
    for artifact in (evaluation, report_md, report_html):
        artifact.metadata.update(result["metadata"])
    for k, v in result["metrics"].items():
        metrics.log_metric(k, v)
