"""validate_parameters: every pipeline parameter checked before any expensive step.

The parameters arrive one by one (as the KFP UI form shows them) and leave as one JSON string that
the other steps read, so each step sees exactly the validated values.
"""
from kfp.dsl import Artifact, Output


def validate_parameters(users_per_client: int,
                        max_examples_per_user: int,
                        min_examples_per_user: int,
                        partition_seed: int,
                        architecture: str,
                        embedding_dim: int,
                        model_seed: int,
                        pretrain_epochs: int,
                        pretrain_batch_size: int,
                        pretrain_learning_rate: float,
                        algorithm: str,
                        rounds: int,
                        clients_per_round: int,
                        mechanism: str,
                        noise_multiplier: float,
                        clip_norm: float,
                        sampling: str,
                        delta: float,
                        accountant: str,
                        epsilon_budget: float,
                        client_learning_rate: float,
                        head_lr_scale: float,
                        reconstruction_steps: int,
                        batch_size: int,
                        max_examples_per_client: int,
                        server_learning_rate: float,
                        server_momentum: float,
                        finetune_rounds: int,
                        finetune_client_learning_rate: float,
                        finetune_noise_multiplier: float,
                        finetune_train_last_layers: int,
                        eval_seed: int,
                        eval_bootstrap_resamples: int,
                        population_id: str,
                        ledger_uri: str,
                        lifetime_epsilon_budget: float,
                        parameters: Output[Artifact]) -> str:
    """Build every step's configuration (a bad value fails here, naming the parameter)."""
    import dataclasses
    import json

    from dpfedemb.config import PipelineParams

    params = PipelineParams(
        users_per_client=users_per_client,
        max_examples_per_user=max_examples_per_user,
        min_examples_per_user=min_examples_per_user,
        partition_seed=partition_seed,
        architecture=architecture,
        embedding_dim=embedding_dim,
        model_seed=model_seed,
        pretrain_epochs=pretrain_epochs,
        pretrain_batch_size=pretrain_batch_size,
        pretrain_learning_rate=pretrain_learning_rate,
        algorithm=algorithm,
        rounds=rounds,
        clients_per_round=clients_per_round,
        mechanism=mechanism,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        sampling=sampling,
        delta=delta,
        accountant=accountant,
        epsilon_budget=epsilon_budget,
        client_learning_rate=client_learning_rate,
        head_lr_scale=head_lr_scale,
        reconstruction_steps=reconstruction_steps,
        batch_size=batch_size,
        max_examples_per_client=max_examples_per_client,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
        finetune_rounds=finetune_rounds,
        finetune_client_learning_rate=finetune_client_learning_rate,
        finetune_noise_multiplier=finetune_noise_multiplier,
        finetune_train_last_layers=finetune_train_last_layers,
        eval_seed=eval_seed,
        eval_bootstrap_resamples=eval_bootstrap_resamples,
        population_id=population_id,
        ledger_uri=ledger_uri,
        lifetime_epsilon_budget=lifetime_epsilon_budget)
    values = dataclasses.asdict(params)
    with open(parameters.path, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True)
    parameters.metadata.update(values)
    return json.dumps(values, sort_keys=True)
