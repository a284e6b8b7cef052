"""DP mechanism description, accounting, calibration and the privacy ledger.

Unit of privacy: one user, all of their examples. Each user belongs to exactly one virtual client
of k users, and the assignment of users to virtual clients is fixed by the partition step.

Neighbouring relation. Per round each sampled virtual client sends its backbone delta clipped to
L2 norm C; the server adds N(0, (z C)^2) to the sum.
- k = 1: a virtual client is one user; adding or removing the user adds or removes one clipped
  delta, sensitivity C: ``add_or_remove_one_user``, accounted as ADD_OR_REMOVE_ONE with noise
  multiplier z.
- k > 1 (and fixed-size sampling, where the accountant's relation is replace-one): changing or
  removing one user's examples *changes* its virtual client's delta rather than removing it. Both
  versions are clipped to C, so the sum moves by at most 2C (measured in
  tests/test_federated.py). We account with sensitivity 2C, i.e. the accountant's noise
  multiplier is z / 2: ``change_one_user_in_virtual_client`` (sensitivity 2C).
  Scope of this relation: the partition step groups users by a ranking of *all* pseudonyms, so
  the grouping is a function of the set of user ids. The guarantee covers everything a user
  contributes (all examples, any values) with that set held fixed; it does not hide whether a
  user id is in the population. With k = 1 the grouping plays no role and adding or removing a
  user is covered as well. Hiding membership with k > 1 needs a grouping that one user cannot
  shift (e.g. hashing pseudonyms into a number of clients fixed in advance, at the price of
  unequal client sizes).
- tree_aggregation (DP-FTRL): no sampling; each virtual client takes part at most once per epoch;
  accounted with SingleEpochTreeAggregationDpEvent under RDP with REPLACE_SPECIAL.
A noise multiplier of 0 is not private: epsilon is infinity, reported as such, never a number.

The accountant is dp-accounting (PLD by default, RDP on request); calibration uses its
``mechanism_calibration`` search. Nothing here writes noise: TFF's aggregators draw it.
CLI: ``python -m dpfedemb.privacy epsilon|calibrate|max-rounds ...``, one JSON object per call.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from typing import Any, Optional, Sequence

import dp_accounting
from dp_accounting import dp_event as ev
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant

from dpfedemb.config import ConfigError, PrivacyConfig, _check, _finite, _int

ADD_REMOVE_USER = "add_or_remove_one_user"
CHANGE_USER_IN_CLIENT = "change_one_user_in_virtual_client (sensitivity 2C)"
TREE_RELATION = "replace_special (tree aggregation, single epoch)"
NeighborRel = dp_accounting.NeighboringRelation
PLD_DISCRETIZATION = 1e-4  # dp-accounting's PLDAccountant default
MIN_NOISE = 0.3  # calibration floor (below it the epsilon is large and PLD needs huge memory)


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """The exact mechanism of one private phase, as run: everything the accountant needs."""

    mechanism: str
    noise_multiplier: float
    clip_norm: float
    sampling: str
    num_clients: int
    clients_per_round: int
    users_per_client: int
    rounds: int
    delta: float
    accountant: str
    clipped_count_stddev: Optional[float] = None

    def __post_init__(self) -> None:
        _check(_int(self.num_clients) and self.num_clients >= 1, "num_clients", self.num_clients,
               "an integer >= 1 (virtual clients in the partition)")
        _check(_int(self.clients_per_round) and 1 <= self.clients_per_round <= self.num_clients,
               "clients_per_round", self.clients_per_round,
               f"an integer in [1, num_clients={self.num_clients}]")
        _check(_int(self.users_per_client) and self.users_per_client >= 1, "users_per_client",
               self.users_per_client, "an integer >= 1")
        _check(_int(self.rounds) and self.rounds >= 0, "rounds", self.rounds, "an integer >= 0")
        if self.mechanism == "tree_aggregation":
            _check(self.rounds * self.clients_per_round <= self.num_clients, "rounds", self.rounds,
                   f"at most num_clients / clients_per_round = "
                   f"{self.num_clients // self.clients_per_round} with tree_aggregation (each "
                   "virtual client takes part at most once)")

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def neighboring_relation(self) -> str:
        if self.mechanism == "tree_aggregation":
            return TREE_RELATION
        if self.users_per_client == 1 and self.sampling == "poisson":
            return ADD_REMOVE_USER
        return CHANGE_USER_IN_CLIENT

    @property
    def accountant_noise_multiplier(self) -> float:
        """z relative to the sensitivity the relation implies (C or 2C)."""
        z = self.noise_multiplier
        if self.mechanism == "tree_aggregation":
            return z / 2 if self.users_per_client > 1 else z
        return z if self.neighboring_relation == ADD_REMOVE_USER else z / 2

    @property
    def effective_accountant(self) -> str:
        """PLD supports Poisson sampling only; fixed-size sampling and trees need RDP."""
        return "rdp" if self.sampling != "poisson" else self.accountant

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(sampling_rate=self.sampling_rate, neighboring_relation=self.neighboring_relation,
                 accountant=self.effective_accountant,
                 accountant_noise_multiplier=self.accountant_noise_multiplier)
        return d


def mechanism_from(cfg: PrivacyConfig, num_clients: int, users_per_client: int,
                   rounds: int) -> Mechanism:
    """The Mechanism a run with these settings performs."""
    stddev = None
    if cfg.mechanism == "gaussian_adaptive" and cfg.noise_multiplier > 0:
        stddev = 0.05 * cfg.clients_per_round  # TFF's default for the clipped-count noise
    return Mechanism(mechanism=cfg.mechanism, noise_multiplier=float(cfg.noise_multiplier),
                     clip_norm=float(cfg.clip_norm),
                     sampling="none" if cfg.mechanism == "tree_aggregation" else cfg.sampling,
                     num_clients=num_clients, clients_per_round=cfg.clients_per_round,
                     users_per_client=users_per_client, rounds=rounds, delta=cfg.delta,
                     accountant=cfg.accountant, clipped_count_stddev=stddev)


def _gaussian_round(m: Mechanism) -> ev.DpEvent:
    z = m.accountant_noise_multiplier
    if m.mechanism != "gaussian_adaptive":
        return ev.GaussianDpEvent(z)
    # TFF splits the budget between the value and the clipped-count query (its own function).
    from tensorflow_federated.python.aggregators.differential_privacy import (
        adaptive_clip_noise_params)
    value_z, count_stddev = adaptive_clip_noise_params(m.noise_multiplier, m.clients_per_round,
                                                       m.clipped_count_stddev)
    # The clipped-count query has sensitivity 0.5 per client (indicator minus 1/2). Two Gaussian
    # queries on the same sample compose exactly into one Gaussian with z^-2 = z1^-2 + z2^-2,
    # the form PLD accepts under Poisson sampling.
    combined = (value_z ** -2 + (count_stddev / 0.5) ** -2) ** -0.5
    return ev.GaussianDpEvent(combined * m.accountant_noise_multiplier / m.noise_multiplier)


def round_event(m: Mechanism) -> ev.DpEvent:
    """The DpEvent of one round, sampling included (tree aggregation: see :func:`phase_event`)."""
    inner = _gaussian_round(m)
    if m.sampling == "poisson":
        return ev.PoissonSampledDpEvent(m.sampling_rate, inner)
    return ev.SampledWithoutReplacementDpEvent(m.num_clients, m.clients_per_round, inner)


def phase_event(m: Mechanism, rounds: Optional[int] = None) -> ev.DpEvent:
    """The DpEvent of ``rounds`` rounds (default: all) of a phase."""
    t = m.rounds if rounds is None else rounds
    if m.mechanism == "tree_aggregation":
        return ev.SingleEpochTreeAggregationDpEvent(m.accountant_noise_multiplier, t)
    return ev.SelfComposedDpEvent(round_event(m), t)


def make_accountant(kind: str, relation: NeighborRel = NeighborRel.ADD_OR_REMOVE_ONE
                    ) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        return pld_privacy_accountant.PLDAccountant(relation)
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)


def accountant_for(m: Mechanism) -> dp_accounting.PrivacyAccountant:
    """The accountant and relation this mechanism's events need."""
    if m.mechanism == "tree_aggregation":
        return make_accountant("rdp", NeighborRel.REPLACE_SPECIAL)
    if m.sampling == "fixed":
        return make_accountant("rdp", NeighborRel.REPLACE_ONE)
    return make_accountant(m.accountant)


@functools.lru_cache(maxsize=32)
def _poisson_gaussian_round_pld(noise_multiplier: float, sampling_rate: float
                                ) -> pld_lib.PrivacyLossDistribution:
    """One round's PLD, built exactly as dp-accounting's PLDAccountant builds it. Building it is
    the slow part (~0.3-1 s); composing it over t rounds is fast, so the per-round epsilon of a
    training run reuses it (memoized, not state: the value depends only on the arguments)."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=PLD_DISCRETIZATION,
        sampling_prob=sampling_rate)


def _fast_pld_epsilon(active: Sequence[tuple[Mechanism, int]], delta: float) -> Optional[float]:
    """PLDAccountant's epsilon for Poisson-sampled Gaussian phases, from memoized round PLDs;
    None when another accountant path applies."""
    if not all(m.effective_accountant == "pld" and m.sampling == "poisson" and
               m.mechanism != "tree_aggregation" for m, _ in active):
        return None
    pld = pld_lib.identity(value_discretization_interval=PLD_DISCRETIZATION)
    for m, t in active:
        event = _gaussian_round(m)
        pld = pld.compose(_poisson_gaussian_round_pld(float(event.noise_multiplier),
                                                      float(m.sampling_rate)).self_compose(t))
    return float(pld.get_epsilon_for_delta(delta))


def epsilon_of(mechanisms: Sequence[tuple[Mechanism, int]], delta: float) -> float:
    """Epsilon at ``delta`` of several phases run in sequence (each with its rounds run)."""
    if any(m.noise_multiplier == 0 and t > 0 for m, t in mechanisms):
        return math.inf
    active = [(m, t) for m, t in mechanisms if t > 0]
    if not active:
        return 0.0
    fast = _fast_pld_epsilon(active, delta)
    if fast is not None:
        return fast
    kinds = {(m.mechanism == "tree_aggregation", m.sampling, m.effective_accountant)
             for m, _ in active}
    if len(kinds) == 1:
        acct = accountant_for(active[0][0])
        acct.compose(ev.ComposedDpEvent([phase_event(m, t) for m, t in active]))
        return float(acct.get_epsilon(delta))
    # Phases that need different accountants compose by basic composition (epsilons and deltas
    # add), splitting delta evenly: conservative and stated in the ledger.
    share = delta / len(active)
    return float(sum(epsilon_of([(m, t)], share) for m, t in active))


def epsilon(m: Mechanism, rounds: Optional[int] = None) -> float:
    return epsilon_of([(m, m.rounds if rounds is None else rounds)], m.delta)


def calibrate_noise(target_epsilon: float, m: Mechanism) -> float:
    """Smallest noise multiplier whose epsilon after ``m.rounds`` is at most the target."""
    _check(_finite(target_epsilon) and target_epsilon > 0, "epsilon", target_epsilon, "> 0")

    def eps(z: float) -> float:
        return epsilon(dataclasses.replace(m, noise_multiplier=float(z)))

    # Bracket by doubling/halving first: PLD at tiny noise multipliers needs huge memory, so the
    # search never goes below MIN_NOISE.
    lo, hi = 0.5, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(f"epsilon={target_epsilon} is unreachable with {m.rounds} rounds")
    if hi == 1.0:
        while lo > MIN_NOISE and eps(lo) <= target_epsilon:
            lo, hi = lo / 2, lo
        if lo <= MIN_NOISE and eps(lo) <= target_epsilon:
            return float(max(lo, MIN_NOISE))

    def make(z: float) -> ev.DpEvent:
        return phase_event(dataclasses.replace(m, noise_multiplier=float(z)))
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: accountant_for(m), make, target_epsilon, m.delta,
        dp_accounting.ExplicitBracketInterval(lo, hi), tol=1e-4)
    # Brent's method returns within tol of the boundary; step up until the target holds.
    while eps(z) > target_epsilon:
        z += 1e-4
    return float(z)


def max_rounds(target_epsilon: float, m: Mechanism, limit: int = 10_000_000) -> int:
    """Largest number of rounds whose epsilon stays at most the target (monotone search)."""
    if not m.private:
        return 0
    ok = lambda t: epsilon(m, t) <= target_epsilon  # noqa: E731
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and ok(hi):
        lo, hi = hi, hi * 2
    if m.mechanism == "tree_aggregation":
        hi = min(hi, m.num_clients // m.clients_per_round + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


# The privacy keys every artifact that carries privacy metadata uses (KFP .metadata, reports,
# privacy.json): lineage queries and auditors find the same names everywhere.
PRIVACY_KEYS = ("mechanism", "noise_multiplier", "clip_norm", "sampling", "sampling_rate",
                "clients_per_round", "rounds", "users_per_client", "num_users", "num_clients",
                "neighboring_relation", "accountant", "epsilon", "delta")


def privacy_metadata(record: dict) -> dict[str, Any]:
    """The :data:`PRIVACY_KEYS` of a privacy.json record (epsilon 'inf' stays a string)."""
    return {k: record.get(k) for k in PRIVACY_KEYS}


def epsilon_json(e: float) -> Any:
    """Epsilon for JSON: infinity is the string "inf" (JSON has no infinity)."""
    return "inf" if math.isinf(e) else e


def _mech_from_args(a: argparse.Namespace, noise: float) -> Mechanism:
    for name in ("noise_multiplier", "sampling_rate", "delta"):
        v = getattr(a, name, None)
        if v is None:
            continue
        if name == "noise_multiplier":
            _check(_finite(v) and v >= 0, "--noise-multiplier", v, ">= 0")
        if name == "sampling_rate":
            _check(_finite(v) and 0 < v <= 1, "--sampling-rate", v, "in (0, 1]")
        if name == "delta":
            _check(_finite(v) and 0 < v < 1, "--delta", v, "in (0, 1)")
    # The sampling rate is what matters; express it as clients_per_round / num_clients.
    num = a.num_clients
    per_round = max(1, round(a.sampling_rate * num))
    _check(abs(per_round / num - a.sampling_rate) < 1e-9 or a.mechanism == "tree_aggregation",
           "--sampling-rate", a.sampling_rate, f"a multiple of 1/--num-clients (1/{num})")
    return Mechanism(mechanism=a.mechanism, noise_multiplier=float(noise), clip_norm=1.0,
                     sampling="none" if a.mechanism == "tree_aggregation" else a.sampling,
                     num_clients=num, clients_per_round=per_round,
                     users_per_client=a.users_per_client, rounds=a.rounds, delta=a.delta,
                     accountant=a.accountant,
                     clipped_count_stddev=0.05 * per_round if a.mechanism == "gaussian_adaptive"
                     else None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpfedemb.privacy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("epsilon", "calibrate", "max-rounds"):
        s = sub.add_parser(name)
        if name == "epsilon":
            s.add_argument("--noise-multiplier", type=float, required=True)
        if name == "calibrate":
            s.add_argument("--epsilon", type=float, required=True)
        if name == "max-rounds":
            s.add_argument("--noise-multiplier", type=float, required=True)
            s.add_argument("--epsilon", type=float, required=True)
        s.add_argument("--sampling-rate", type=float, required=True)
        s.add_argument("--num-clients", type=int, default=1_000_000,
                       help="virtual clients in the population (sampling rate x this = per round)")
        if name != "max-rounds":
            s.add_argument("--rounds", type=int, required=True)
        s.add_argument("--delta", type=float, required=True)
        s.add_argument("--accountant", choices=["pld", "rdp"], default="pld")
        s.add_argument("--users-per-client", type=int, default=1)
        s.add_argument("--sampling", choices=["poisson", "fixed"], default="poisson")
        s.add_argument("--mechanism", choices=["gaussian_fixed", "gaussian_adaptive",
                                               "tree_aggregation"], default="gaussian_fixed")
    a = p.parse_args(argv)
    try:
        if a.command == "max-rounds":
            a.rounds = 1
        m = _mech_from_args(a, getattr(a, "noise_multiplier", 1.0))
        if a.command == "epsilon":
            out = {"epsilon": epsilon_json(epsilon(m)), **m.to_dict()}
        elif a.command == "calibrate":
            z = calibrate_noise(a.epsilon, m)
            m = dataclasses.replace(m, noise_multiplier=z)
            out = {"noise_multiplier": z, "epsilon": epsilon_json(epsilon(m)),
                   "target_epsilon": a.epsilon, **m.to_dict()}
        else:
            t = max_rounds(a.epsilon, m)
            out = {"rounds": t, "epsilon": epsilon_json(epsilon(m, t)) if t else 0.0,
                   "target_epsilon": a.epsilon, **{k: v for k, v in m.to_dict().items()
                                                   if k != "rounds"}}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
