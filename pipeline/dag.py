"""The DP-FedEmb pipeline DAG: partition -> pretrain -> DP train -> fine-tune -> evaluate.

Built by :func:`build_pipeline` for given container images and accelerator name (the accelerator
is a compile option: Vertex says ``NVIDIA_TESLA_T4``, Kubeflow ``nvidia.com/gpu``). Every
parameter is typed, defaulted (from :class:`dpfedemb.config.PipelineParams`) and described, so a
UI launch shows a usable form; ``validate_parameters`` checks them all before any expensive step.
No ParallelFor/Condition/ExitHandler: the same DAG runs under kfp.local.
"""

from typing import Callable

from kfp import dsl

import components
from dpfedemb.config import PipelineParams

D = PipelineParams()
PIPELINE_NAME = "dpfedemb"
DEFAULT_ACCELERATOR = "NVIDIA_TESLA_T4"


def build_pipeline(accelerator: str = DEFAULT_ACCELERATOR, cpu_image: str = components.CPU_IMAGE,
                   gpu_image: str = components.GPU_IMAGE, gpu: bool = True) -> Callable:
    """The @dsl.pipeline function; ``gpu=False`` drops accelerator requests (local runs)."""
    c = components.build(cpu_image, gpu_image)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="User-level DP image embeddings (DP-FedEmb): partition users, "
                              "pretrain on public data, train and fine-tune with DP on TFF, "
                              "evaluate, with a privacy ledger in the lineage.")
    def dpfedemb_pipeline(
        data_dir: str,
        pseudonym_key_file: str = "",
        users_per_client: int = D.users_per_client,
        max_examples_per_user: int = D.max_examples_per_user,
        min_examples_per_user: int = D.min_examples_per_user,
        partition_seed: int = D.partition_seed,
        architecture: str = D.architecture,
        embedding_dim: int = D.embedding_dim,
        model_seed: int = D.model_seed,
        pretrain_epochs: int = D.pretrain_epochs,
        pretrain_batch_size: int = D.pretrain_batch_size,
        pretrain_learning_rate: float = D.pretrain_learning_rate,
        algorithm: str = D.algorithm,
        rounds: int = D.rounds,
        clients_per_round: int = D.clients_per_round,
        mechanism: str = D.mechanism,
        noise_multiplier: float = D.noise_multiplier,
        clip_norm: float = D.clip_norm,
        sampling: str = D.sampling,
        delta: float = D.delta,
        accountant: str = D.accountant,
        epsilon_budget: float = D.epsilon_budget,
        client_learning_rate: float = D.client_learning_rate,
        head_lr_scale: float = D.head_lr_scale,
        reconstruction_steps: int = D.reconstruction_steps,
        batch_size: int = D.batch_size,
        max_examples_per_client: int = D.max_examples_per_client,
        server_learning_rate: float = D.server_learning_rate,
        server_momentum: float = D.server_momentum,
        finetune_rounds: int = D.finetune_rounds,
        finetune_client_learning_rate: float = D.finetune_client_learning_rate,
        finetune_noise_multiplier: float = D.finetune_noise_multiplier,
        finetune_train_last_layers: int = D.finetune_train_last_layers,
        eval_seed: int = D.eval_seed,
        eval_bootstrap_resamples: int = D.eval_bootstrap_resamples,
        population_id: str = D.population_id,
        ledger_uri: str = D.ledger_uri,
        lifetime_epsilon_budget: float = D.lifetime_epsilon_budget,
    ):
        """DP-FedEmb training pipeline.

        Args:
            data_dir: imported data set folder (card.json and public/private/eval TFRecords), local or gs://.
            pseudonym_key_file: file holding the pseudonym HMAC key (a run secret; empty = env DPFEDEMB_PSEUDONYM_KEY).
            users_per_client: users grouped into one virtual client (k); k > 1 doubles the sensitivity the accountant uses.
            max_examples_per_user: cap on each user's examples (chosen by hash, not arrival order).
            min_examples_per_user: users with fewer valid examples are dropped (and counted).
            partition_seed: seed of example capping and user-to-client grouping.
            architecture: backbone: small_cnn (28x28 grey, CPU-friendly) or mobilenet_v2_gn.
            embedding_dim: embedding dimension.
            model_seed: seed of model initialization and pretraining.
            pretrain_epochs: epochs of non-private pretraining on the public split.
            pretrain_batch_size: batch size of pretraining.
            pretrain_learning_rate: Adam learning rate of pretraining.
            algorithm: dp_fedemb (local heads, backbone aggregated) or dp_fedavg (global head baseline).
            rounds: DP training rounds.
            clients_per_round: expected virtual clients per round (Poisson rate = this / clients).
            mechanism: gaussian_fixed, gaussian_adaptive or tree_aggregation.
            noise_multiplier: Gaussian noise std / clip norm (0 = not private: epsilon infinite).
            clip_norm: L2 clip of each virtual client's backbone delta (initial clip if adaptive).
            sampling: poisson (accounted with amplification) or fixed (sampled without replacement).
            delta: target delta; keep below 1 / users.
            accountant: pld (tight, default) or rdp.
            epsilon_budget: stop before a round would exceed this total epsilon (0 = no budget).
            client_learning_rate: client SGD learning rate of the backbone.
            head_lr_scale: local head learning rate = client learning rate x this.
            reconstruction_steps: batches that train only the fresh local head before joint training.
            batch_size: client batch size.
            max_examples_per_client: examples a virtual client uses per round.
            server_learning_rate: server SGD learning rate.
            server_momentum: server SGD momentum.
            finetune_rounds: private fine-tuning rounds after training (0 = skip).
            finetune_client_learning_rate: client learning rate of fine-tuning.
            finetune_noise_multiplier: noise multiplier of fine-tuning (composes with training).
            finetune_train_last_layers: backbone layers fine-tuning trains (from the top; 0 = all).
            eval_seed: seed of impostor-pair sampling and bootstrap.
            eval_bootstrap_resamples: bootstrap resamples for confidence intervals.
            population_id: name of the user population whose lifetime privacy spending the ledger tracks.
            ledger_uri: lifetime privacy ledger (file or gs://bucket/object; empty = none).
            lifetime_epsilon_budget: refuse to train if the population's lifetime epsilon would pass this (0 = none).
        """
        params = c.validate_parameters(
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
            lifetime_epsilon_budget=lifetime_epsilon_budget,
        ).set_display_name("validate parameters")
        params_json = params.outputs["Output"]
        part = c.partition_users(data_dir=data_dir, params_json=params_json,
                                 pseudonym_key_file=pseudonym_key_file)
        part.set_display_name("partition users").set_cpu_limit("2").set_memory_limit("8G")
        pre = c.pretrain_public(data_dir=data_dir, params_json=params_json)
        pre.set_display_name("pretrain (public, non-private)").after(params)
        pre.set_cpu_limit("4").set_memory_limit("16G")
        trn = c.train_dp_federated(params_json=params_json, partitions=part.outputs["partitions"],
                                   init_model=pre.outputs["model"],
                                   pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        trn.set_display_name("DP federated training")
        fin = c.finetune(params_json=params_json, partitions=part.outputs["partitions"],
                         init_model=trn.outputs["model"],
                         prior_ledger=trn.outputs["privacy_ledger"],
                         pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        fin.set_display_name("DP fine-tuning")
        for task in (trn, fin):
            task.set_cpu_limit("8").set_memory_limit("32G")
            if gpu:
                task.set_accelerator_type(accelerator).set_accelerator_limit(1)
        ev = c.evaluate(data_dir=data_dir, params_json=params_json,
                        partitions=part.outputs["partitions"], pretrained=pre.outputs["model"],
                        trained=trn.outputs["model"], finetuned=fin.outputs["model"],
                        privacy_ledger=fin.outputs["privacy_ledger"])
        ev.set_display_name("evaluate and report").set_cpu_limit("4").set_memory_limit("16G")

    return dpfedemb_pipeline
