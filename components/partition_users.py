"""partition_users: Beam partitioning into virtual clients (Dataset + stats Metrics)."""
from kfp.dsl import Dataset, Metrics, Output


def partition_users(data_dir: str, params_json: str, pseudonym_key_file: str,
                    partitions: Output[Dataset], stats: Output[Metrics]) -> None:
    """Validate, pseudonymize, cap and group the private split's users into virtual clients."""
    import json

    from dpfedemb import steps

    result = steps.partition(data_dir, partitions.path, json.loads(params_json), pseudonym_key_file)
    partitions.metadata.update(result["metadata"])
    for k, v in result["metrics"].items():
        stats.log_metric(k, v)
