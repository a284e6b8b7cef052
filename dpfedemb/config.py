"""Every step's parameters as frozen dataclasses, validated in one place.

Each dataclass validates itself in ``__post_init__`` through :func:`_check`, so a bad value fails
before any work with a message naming the parameter, the value and the allowed range.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Type, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter is outside its allowed range; the message names it and the fix."""

    def __init__(self, message: str, name: str = "", value: Any = None, allowed: str = "") -> None:
        super().__init__(message)
        self.name, self.value, self.allowed = name, value, allowed


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name}={value!r}: must be {allowed}", name, value, allowed)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Shape of the model's input images (from the data set card)."""

    height: int = 28
    width: int = 28
    channels: int = 1

    def __post_init__(self) -> None:
        for f in ("height", "width"):
            v = getattr(self, f)
            _check(_int(v) and 8 <= v <= 1024, f, v, "an integer in [8, 1024]")
        _check(self.channels in (1, 3), "channels", self.channels, "1 (grey) or 3 (RGB)")


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """How users are simulated for a data set that has none (non-IID, seeded)."""

    mean_examples_per_user: float = 20.0
    dirichlet_alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _check(_finite(self.mean_examples_per_user) and self.mean_examples_per_user >= 1,
               "mean_examples_per_user", self.mean_examples_per_user, "a number >= 1")
        _check(_finite(self.dirichlet_alpha) and self.dirichlet_alpha > 0,
               "dirichlet_alpha", self.dirichlet_alpha, "a number > 0 (smaller = more skewed)")
        _check(_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    """Beam partitioning: validation limits, caps and virtual-client size."""

    users_per_client: int = 1
    max_examples_per_user: int = 64
    min_examples_per_user: int = 1
    max_image_side: int = 1024
    allowed_channels: tuple[int, ...] = (1, 3)
    max_user_id_bytes: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check(_int(self.users_per_client) and 1 <= self.users_per_client <= 100_000,
               "users_per_client", self.users_per_client, "an integer in [1, 100000]")
        _check(_int(self.max_examples_per_user) and self.max_examples_per_user >= 1,
               "max_examples_per_user", self.max_examples_per_user, "an integer >= 1")
        _check(_int(self.min_examples_per_user) and
               1 <= self.min_examples_per_user <= self.max_examples_per_user,
               "min_examples_per_user", self.min_examples_per_user,
               f"an integer in [1, max_examples_per_user={self.max_examples_per_user}]")
        _check(_int(self.max_image_side) and self.max_image_side >= 1,
               "max_image_side", self.max_image_side, "an integer >= 1")
        _check(bool(self.allowed_channels) and all(c in (1, 3, 4) for c in self.allowed_channels),
               "allowed_channels", self.allowed_channels, "a non-empty subset of (1, 3, 4)")
        _check(_int(self.max_user_id_bytes) and 1 <= self.max_user_id_bytes <= 4096,
               "max_user_id_bytes", self.max_user_id_bytes, "an integer in [1, 4096]")
        _check(_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone architecture and embedding."""

    architecture: str = "small_cnn"
    embedding_dim: int = 128
    image: ImageSpec = ImageSpec()
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.architecture in ("small_cnn", "mobilenet_v2_gn"), "architecture",
               self.architecture, "'small_cnn' or 'mobilenet_v2_gn'")
        _check(_int(self.embedding_dim) and 2 <= self.embedding_dim <= 4096, "embedding_dim",
               self.embedding_dim, "an integer in [2, 4096]")
        _check(_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Centralized, non-private training of the backbone with a softmax head."""

    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check(_int(self.epochs) and 0 <= self.epochs <= 10_000, "epochs", self.epochs,
               "an integer in [0, 10000]")
        _check(_int(self.batch_size) and 1 <= self.batch_size <= 65_536, "batch_size",
               self.batch_size, "an integer in [1, 65536]")
        _check(_finite(self.learning_rate) and self.learning_rate > 0, "learning_rate",
               self.learning_rate, "a number > 0")
        _check(self.optimizer in ("adam", "sgdm"), "optimizer", self.optimizer, "'adam' or 'sgdm'")
        _check(_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")


def from_mapping(cls: Type[T], values: Mapping[str, Any]) -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**values)  # type: ignore[call-arg]


def as_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


MECHANISMS = ("gaussian_fixed", "gaussian_adaptive", "tree_aggregation")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """The DP mechanism of one private phase (training or fine-tuning)."""

    mechanism: str = "gaussian_fixed"
    noise_multiplier: float = 1.0
    clip_norm: float = 0.5
    target_unclipped_quantile: float = 0.5
    sampling: str = "poisson"
    clients_per_round: int = 10
    delta: float = 1e-5
    accountant: str = "pld"
    epsilon_budget: Optional[float] = None

    def __post_init__(self) -> None:
        _check(self.mechanism in MECHANISMS, "mechanism", self.mechanism, f"one of {MECHANISMS}")
        _check(_finite(self.noise_multiplier) and self.noise_multiplier >= 0, "noise_multiplier",
               self.noise_multiplier, "a number >= 0 (0 = not private)")
        _check(_finite(self.clip_norm) and self.clip_norm > 0, "clip_norm", self.clip_norm,
               "a number > 0")
        _check(_finite(self.target_unclipped_quantile) and 0 < self.target_unclipped_quantile < 1,
               "target_unclipped_quantile", self.target_unclipped_quantile, "in (0, 1)")
        _check(self.sampling in ("poisson", "fixed"), "sampling", self.sampling,
               "'poisson' (what the accountant assumes by default) or 'fixed'")
        _check(_int(self.clients_per_round) and self.clients_per_round >= 1, "clients_per_round",
               self.clients_per_round, "an integer >= 1")
        _check(_finite(self.delta) and 0 < self.delta < 1, "delta", self.delta,
               "in (0, 1), below 1/users")
        _check(self.accountant in ("pld", "rdp"), "accountant", self.accountant, "'pld' or 'rdp'")
        _check(self.epsilon_budget is None or (_finite(self.epsilon_budget) and
                                               self.epsilon_budget > 0),
               "epsilon_budget", self.epsilon_budget, "a number > 0, or unset")
        _check(self.mechanism != "tree_aggregation" or self.accountant == "rdp", "accountant",
               self.accountant, "'rdp' with tree_aggregation (PLD does not support it)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Federated rounds: client work, server optimizer, checkpoints (DP settings separate)."""

    algorithm: str = "dp_fedemb"
    rounds: int = 20
    client_learning_rate: float = 0.05
    head_lr_scale: float = 10.0
    reconstruction_steps: int = 2
    local_epochs: int = 1
    batch_size: int = 16
    max_examples_per_client: int = 64
    head: str = "dense"
    head_init: str = "prototype"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    train_last_layers: int = 0
    checkpoint_every: int = 5
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self.algorithm in ("dp_fedemb", "dp_fedavg"), "algorithm", self.algorithm,
               "'dp_fedemb' (local heads, backbone aggregated) or 'dp_fedavg' (global head)")
        _check(_int(self.rounds) and 0 <= self.rounds <= 1_000_000, "rounds", self.rounds,
               "an integer in [0, 1000000]")
        for f in ("client_learning_rate", "head_lr_scale", "server_learning_rate"):
            v = getattr(self, f)
            _check(_finite(v) and v > 0, f, v, "a number > 0")
        _check(_int(self.reconstruction_steps) and self.reconstruction_steps >= 0,
               "reconstruction_steps", self.reconstruction_steps, "an integer >= 0")
        _check(_int(self.local_epochs) and 1 <= self.local_epochs <= 100, "local_epochs",
               self.local_epochs, "an integer in [1, 100]")
        _check(_int(self.batch_size) and 1 <= self.batch_size <= 4096, "batch_size",
               self.batch_size, "an integer in [1, 4096]")
        _check(_int(self.max_examples_per_client) and self.max_examples_per_client >= 1,
               "max_examples_per_client", self.max_examples_per_client, "an integer >= 1")
        _check(self.head in ("dense", "cosine"), "head", self.head, "'dense' or 'cosine'")
        _check(self.head_init in ("prototype", "random"), "head_init", self.head_init,
               "'prototype' (class means of the client's embeddings) or 'random' (seeded)")
        _check(_finite(self.server_momentum) and 0 <= self.server_momentum < 1,
               "server_momentum", self.server_momentum, "in [0, 1)")
        _check(_int(self.train_last_layers) and self.train_last_layers >= 0, "train_last_layers",
               self.train_last_layers, "an integer >= 0 (0 = all layers train)")
        _check(_int(self.checkpoint_every) and self.checkpoint_every >= 1, "checkpoint_every",
               self.checkpoint_every, "an integer >= 1")
        _check(self.seed is None or (_int(self.seed) and self.seed >= 0), "seed", self.seed,
               "unset (secret, from the OS) or an integer >= 0 (tests only: makes sampling "
               "predictable)")


@dataclasses.dataclass(frozen=True)
class LifetimeConfig:
    """Where a run records its spending for its population, and the population's budget."""

    ledger_uri: str
    population_id: str
    budget: Optional[float] = None
    run_id: str = "manual"
    pipeline_job: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.ledger_uri), "ledger_uri", self.ledger_uri, "a file path or gs:// URI")
        _check(bool(self.population_id), "population_id", self.population_id, "non-empty")
        _check(self.budget is None or (_finite(self.budget) and self.budget > 0),
               "lifetime_epsilon_budget", self.budget, "a number > 0, or unset")
        _check(bool(self.run_id), "run_id", self.run_id, "non-empty")


@dataclasses.dataclass(frozen=True)
class PipelineParams:
    """Every pipeline parameter (the KFP UI form), flat, with the step configs derived from it.

    ``epsilon_budget`` 0 means no budget (KFP parameters cannot be None).
    """

    users_per_client: int = 1
    max_examples_per_user: int = 64
    min_examples_per_user: int = 1
    partition_seed: int = 0
    architecture: str = "small_cnn"
    embedding_dim: int = 128
    model_seed: int = 0
    pretrain_epochs: int = 3
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 1e-3
    algorithm: str = "dp_fedemb"
    rounds: int = 20
    clients_per_round: int = 50
    mechanism: str = "gaussian_fixed"
    noise_multiplier: float = 0.7
    clip_norm: float = 0.5
    sampling: str = "poisson"
    delta: float = 1e-5
    accountant: str = "pld"
    epsilon_budget: float = 0.0
    # Measured on the default data (Fashion-MNIST, ~2,900 users, 50 clients/round, z=0.7, 20
    # rounds, epsilon 2.44): server lr 1.0 / momentum 0.9 / client lr 0.02 lowered recall@1 from
    # 0.819 (pretrained) to 0.796, because the noise (norm ~7.7 per round over 1.2M weights)
    # outweighs the clipped signal; lr 0.3 / momentum 0.5 / client lr 0.05 raised it to 0.828.
    client_learning_rate: float = 0.05
    head_lr_scale: float = 10.0
    reconstruction_steps: int = 2
    batch_size: int = 16
    max_examples_per_client: int = 32
    server_learning_rate: float = 0.3
    server_momentum: float = 0.5
    finetune_rounds: int = 0
    finetune_client_learning_rate: float = 0.01
    finetune_noise_multiplier: float = 0.7
    finetune_train_last_layers: int = 1
    eval_seed: int = 0
    eval_bootstrap_resamples: int = 200
    population_id: str = "default"
    ledger_uri: str = ""
    lifetime_epsilon_budget: float = 0.0

    def __post_init__(self) -> None:
        _check(bool(self.population_id.strip()), "population_id", self.population_id,
               "a non-empty name of the user population")
        _check(self.ledger_uri == "" or not self.ledger_uri.endswith("/"), "ledger_uri",
               self.ledger_uri, "empty (no lifetime ledger) or a file path / gs://bucket/object")
        _check(_finite(self.lifetime_epsilon_budget) and self.lifetime_epsilon_budget >= 0,
               "lifetime_epsilon_budget", self.lifetime_epsilon_budget,
               "a number >= 0 (0 = no lifetime budget)")
        _check(self.lifetime_epsilon_budget == 0 or self.ledger_uri != "", "ledger_uri",
               self.ledger_uri, "set when lifetime_epsilon_budget is set (the ledger holds the "
               "population's past spending)")
        _check(_finite(self.epsilon_budget) and self.epsilon_budget >= 0, "epsilon_budget",
               self.epsilon_budget, "a number >= 0 (0 = no budget)")
        for f in ("eval_seed", "model_seed"):
            v = getattr(self, f)
            _check(_int(v) and v >= 0, f, v, "an integer >= 0")
        _check(_int(self.eval_bootstrap_resamples) and 0 <= self.eval_bootstrap_resamples <= 10_000,
               "eval_bootstrap_resamples", self.eval_bootstrap_resamples, "in [0, 10000]")
        # Building every derived config validates every other field, naming it.
        self.partition()
        self.model(ImageSpec())
        self.pretrain()
        self.train_phase("train")
        self.train_phase("finetune")

    def _derive(self, cls: Type[T], names: Mapping[str, str], **fixed: Any) -> T:
        """``cls`` built from pipeline parameters (``names``: config field -> parameter) and
        ``fixed`` values; an invalid value is reported under the pipeline parameter's name,
        the one the user set."""
        try:
            return cls(**{f: getattr(self, p) for f, p in names.items()}, **fixed)
        except ConfigError as e:
            name = names.get(e.name, e.name)
            raise ConfigError(f"invalid {name}={e.value!r}: must be {e.allowed}", name, e.value,
                              e.allowed) from None

    def lifetime(self, run_id: str, pipeline_job: str) -> Optional["LifetimeConfig"]:
        if not self.ledger_uri:
            return None
        return LifetimeConfig(ledger_uri=self.ledger_uri, population_id=self.population_id,
                              budget=self.lifetime_epsilon_budget or None, run_id=run_id,
                              pipeline_job=pipeline_job)

    def partition(self) -> PartitionConfig:
        return self._derive(PartitionConfig, {
            "users_per_client": "users_per_client", "max_examples_per_user": "max_examples_per_user",
            "min_examples_per_user": "min_examples_per_user", "seed": "partition_seed"})

    def model(self, image: ImageSpec) -> ModelConfig:
        return self._derive(ModelConfig, {"architecture": "architecture",
                                          "embedding_dim": "embedding_dim", "seed": "model_seed"},
                            image=image)

    def pretrain(self) -> PretrainConfig:
        return self._derive(PretrainConfig, {
            "epochs": "pretrain_epochs", "batch_size": "pretrain_batch_size",
            "learning_rate": "pretrain_learning_rate", "seed": "model_seed"})

    def train_phase(self, phase: str) -> tuple[TrainConfig, PrivacyConfig]:
        """The (TrainConfig, PrivacyConfig) of the 'train' or 'finetune' phase."""
        fine = phase == "finetune"
        shared = {f: f for f in ("algorithm", "head_lr_scale", "reconstruction_steps", "batch_size",
                                 "max_examples_per_client", "server_learning_rate",
                                 "server_momentum")}
        if fine:
            train = self._derive(TrainConfig, {
                **shared, "rounds": "finetune_rounds",
                "client_learning_rate": "finetune_client_learning_rate",
                "train_last_layers": "finetune_train_last_layers"})
        else:
            train = self._derive(TrainConfig, {**shared, "rounds": "rounds",
                                               "client_learning_rate": "client_learning_rate"},
                                 train_last_layers=0)
        # Tree aggregation is accounted under RDP only (PLD does not support it).
        priv = self._derive(PrivacyConfig, {
            "mechanism": "mechanism", "clip_norm": "clip_norm", "sampling": "sampling",
            "clients_per_round": "clients_per_round", "delta": "delta",
            "noise_multiplier": "finetune_noise_multiplier" if fine else "noise_multiplier"},
            accountant="rdp" if self.mechanism == "tree_aggregation" else self.accountant,
            epsilon_budget=self.epsilon_budget or None)
        return train, priv
