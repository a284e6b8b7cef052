"""Every parameter is validated before work: the table lists each invalid value tried."""
import pytest

from dpfedemb.config import (ConfigError, ImageSpec, ModelConfig, PartitionConfig, PipelineParams,
                             PretrainConfig, PrivacyConfig, SimulationConfig, TrainConfig)

INVALID = [
    # (config, field, bad value, words the message must contain)
    (PipelineParams, "users_per_client", 0, "[1, 100000]"),
    (PipelineParams, "max_examples_per_user", 0, ">= 1"),
    (PipelineParams, "min_examples_per_user", 100, "max_examples_per_user"),
    (PipelineParams, "partition_seed", -1, ">= 0"),
    (PipelineParams, "architecture", "resnet", "small_cnn"),
    (PipelineParams, "embedding_dim", 1, "[2, 4096]"),
    (PipelineParams, "model_seed", -3, ">= 0"),
    (PipelineParams, "pretrain_epochs", -1, "[0, 10000]"),
    (PipelineParams, "pretrain_batch_size", 0, "[1, 65536]"),
    (PipelineParams, "pretrain_learning_rate", 0.0, "> 0"),
    (PipelineParams, "algorithm", "fedsgd", "dp_fedemb"),
    (PipelineParams, "rounds", -5, "[0, 1000000]"),
    (PipelineParams, "clients_per_round", 0, ">= 1"),
    (PipelineParams, "mechanism", "laplace", "gaussian_fixed"),
    (PipelineParams, "noise_multiplier", -0.5, ">= 0"),
    (PipelineParams, "noise_multiplier", float("nan"), ">= 0"),
    (PipelineParams, "clip_norm", 0.0, "> 0"),
    (PipelineParams, "sampling", "shuffle", "poisson"),
    (PipelineParams, "delta", 1.0, "(0, 1)"),
    (PipelineParams, "delta", 0.0, "(0, 1)"),
    (PipelineParams, "accountant", "moments", "'pld' or 'rdp'"),
    (PipelineParams, "epsilon_budget", -1.0, ">= 0"),
    (PipelineParams, "client_learning_rate", -0.1, "> 0"),
    (PipelineParams, "head_lr_scale", 0.0, "> 0"),
    (PipelineParams, "reconstruction_steps", -1, ">= 0"),
    (PipelineParams, "batch_size", 0, "[1, 4096]"),
    (PipelineParams, "max_examples_per_client", 0, ">= 1"),
    (PipelineParams, "server_learning_rate", float("inf"), "> 0"),
    (PipelineParams, "server_momentum", 1.0, "[0, 1)"),
    (PipelineParams, "finetune_rounds", -1, "[0, 1000000]"),
    (PipelineParams, "finetune_client_learning_rate", 0.0, "> 0"),
    (PipelineParams, "finetune_noise_multiplier", -1.0, ">= 0"),
    (PipelineParams, "finetune_train_last_layers", -1, ">= 0"),
    (PipelineParams, "eval_seed", -1, ">= 0"),
    (PipelineParams, "eval_bootstrap_resamples", 20_000, "[0, 10000]"),
    (PipelineParams, "population_id", " ", "non-empty"),
    (PipelineParams, "ledger_uri", "gs://bucket/", "gs://bucket/object"),
    (PipelineParams, "lifetime_epsilon_budget", -2.0, ">= 0"),
    (PipelineParams, "lifetime_epsilon_budget", 5.0, "set when lifetime_epsilon_budget"),
    (ImageSpec, "height", 4, "[8, 1024]"),
    (ImageSpec, "channels", 2, "1 (grey) or 3"),
    (SimulationConfig, "mean_examples_per_user", 0.5, ">= 1"),
    (SimulationConfig, "dirichlet_alpha", 0.0, "> 0"),
    (PartitionConfig, "allowed_channels", (), "non-empty"),
    (PartitionConfig, "max_user_id_bytes", 0, "[1, 4096]"),
    (PretrainConfig, "optimizer", "rmsprop", "'adam' or 'sgdm'"),
    (PrivacyConfig, "target_unclipped_quantile", 1.0, "in (0, 1)"),
    (TrainConfig, "local_epochs", 0, "[1, 100]"),
    (TrainConfig, "checkpoint_every", 0, ">= 1"),
    (TrainConfig, "seed", -1, ">= 0"),
    (TrainConfig, "head", "mlp", "'dense' or 'cosine'"),
    (TrainConfig, "head_init", "zeros", "'prototype'"),
    (ModelConfig, "embedding_dim", True, "integer"),
]


@pytest.mark.parametrize("cls,field,value,words", INVALID,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v, _ in INVALID])
def test_invalid_value_names_the_parameter_and_the_range(cls, field, value, words):
    with pytest.raises(ConfigError) as e:
        cls(**{field: value})
    msg = str(e.value)
    assert field in msg and words in msg


def test_defaults_are_valid_and_unknown_names_are_rejected():
    PipelineParams()
    from dpfedemb.config import from_mapping
    with pytest.raises(ConfigError, match="unknown parameter"):
        from_mapping(PipelineParams, {"roundz": 3})


@pytest.mark.parametrize("argv,words", [
    (["run", "--param", "rounds=-1"], "rounds"),
    (["run", "--param", "roundz=1"], "unknown parameter"),
    (["run", "--param", "rounds=ten"], "expected int"),
])
def test_pipeline_cli_validates_before_work(argv, words, capsys, tmp_path):
    from pipeline.__main__ import main
    with pytest.raises(SystemExit) if "=" in argv[-1] and words != "rounds" else \
            _no_raise():
        rc = main(argv + ["--runs-dir", str(tmp_path / "runs"), "--data-dir",
                          str(tmp_path / "none")])
        assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("argv,words", [
    (["--clients", "x", "--init", "y", "--output", "z", "--noise-multiplier", "-1"],
     "noise_multiplier"),
    (["--clients", "x", "--init", "y", "--output", "z", "--delta", "2"], "delta"),
    (["--clients", "x", "--init", "y", "--output", "z", "--rounds", "-2"], "rounds"),
])
def test_train_cli_validates_before_work(argv, words, capsys):
    from dpfedemb.train import main
    assert main(argv) == 2
    assert words in capsys.readouterr().err
