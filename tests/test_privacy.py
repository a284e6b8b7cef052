"""Accounting, relations, calibration and the privacy CLI."""
import json
import math

import dp_accounting
import pytest
from dp_accounting import dp_event as ev
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpfedemb import privacy
from dpfedemb.config import ConfigError, PrivacyConfig


def _mech(**kw):
    base = dict(mechanism="gaussian_fixed", noise_multiplier=1.0, clip_norm=1.0, sampling="poisson",
                num_clients=10_000, clients_per_round=100, users_per_client=1, rounds=200,
                delta=1e-6, accountant="pld")
    base.update(kw)
    return privacy.Mechanism(**base)


def test_epsilon_equals_dp_accounting_pld_and_rdp():
    m = _mech()
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(0.01, ev.GaussianDpEvent(1.0)), 200))
    assert privacy.epsilon(m) == pytest.approx(pld.get_epsilon(1e-6), rel=1e-9)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(0.01, ev.GaussianDpEvent(1.0)), 200))
    assert privacy.epsilon(_mech(accountant="rdp")) == pytest.approx(rdp.get_epsilon(1e-6), rel=1e-9)
    # PLD is tighter than RDP for the same mechanism.
    assert privacy.epsilon(m) < privacy.epsilon(_mech(accountant="rdp"))


def test_users_per_client_above_one_doubles_sensitivity():
    one, four = _mech(), _mech(users_per_client=4)
    assert one.neighboring_relation == privacy.ADD_REMOVE_USER
    assert four.accountant_noise_multiplier == 0.5
    assert privacy.epsilon(four) == pytest.approx(
        privacy.epsilon(_mech(noise_multiplier=0.5)), rel=1e-9)
    assert privacy.epsilon(four) > privacy.epsilon(one)


def test_zero_noise_is_infinite_never_a_number():
    m = _mech(noise_multiplier=0.0)
    assert math.isinf(privacy.epsilon(m))
    assert privacy.epsilon_json(privacy.epsilon(m)) == "inf"
    assert privacy.epsilon(m, rounds=0) == 0.0


def test_tree_and_fixed_sampling_events():
    tree = _mech(mechanism="tree_aggregation", sampling="none", rounds=50, accountant="rdp")
    acct = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    acct.compose(ev.SingleEpochTreeAggregationDpEvent(1.0, 50))
    assert privacy.epsilon(tree) == pytest.approx(acct.get_epsilon(1e-6))
    with pytest.raises(ConfigError, match="at most once"):
        _mech(mechanism="tree_aggregation", sampling="none", rounds=101, accountant="rdp")
    fixed = _mech(sampling="fixed")
    assert fixed.effective_accountant == "rdp" and math.isfinite(privacy.epsilon(fixed))


def test_adaptive_round_event_composes_to_the_nominal_noise():
    m = _mech(mechanism="gaussian_adaptive", clipped_count_stddev=5.0)
    e = privacy.round_event(m)
    assert isinstance(e.event, ev.GaussianDpEvent)
    assert e.event.noise_multiplier == pytest.approx(1.0, rel=1e-6)


def test_epsilon_is_monotone_in_rounds_and_noise():
    m = _mech(rounds=100)
    assert privacy.epsilon(m, 50) < privacy.epsilon(m, 100) < privacy.epsilon(m, 200)
    assert privacy.epsilon(_mech(noise_multiplier=2.0)) < privacy.epsilon(m)


def test_calibration_meets_target_and_is_monotone():
    m = _mech(rounds=100, accountant="rdp")
    z2 = privacy.calibrate_noise(2.0, m)
    z4 = privacy.calibrate_noise(4.0, m)
    assert z4 < z2
    import dataclasses
    assert privacy.epsilon(dataclasses.replace(m, noise_multiplier=z2)) <= 2.0
    assert privacy.epsilon(dataclasses.replace(m, noise_multiplier=z2 * 0.98)) > 2.0


def test_max_rounds_is_the_largest_within_budget():
    m = _mech(noise_multiplier=1.5, accountant="rdp")
    t = privacy.max_rounds(1.0, m)
    assert t > 0 and privacy.epsilon(m, t) <= 1.0 < privacy.epsilon(m, t + 1)


def test_composition_of_phases():
    a, b = _mech(rounds=100), _mech(rounds=50, noise_multiplier=2.0)
    both = privacy.epsilon_of([(a, 100), (b, 50)], 1e-6)
    assert both > max(privacy.epsilon(a), privacy.epsilon(b))
    assert both < privacy.epsilon(a) + privacy.epsilon(b)


@pytest.mark.parametrize("args,match", [
    (["epsilon", "--noise-multiplier", "-1", "--sampling-rate", "0.01", "--rounds", "5",
      "--delta", "1e-6"], "noise-multiplier"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-rate", "1.5", "--rounds", "5",
      "--delta", "1e-6"], "sampling-rate"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.01", "--rounds", "5",
      "--delta", "1"], "delta"),
])
def test_cli_rejects_bad_values(args, match, capsys):
    assert privacy.main(args) == 2
    assert match in capsys.readouterr().err


def test_cli_prints_one_json_object(capsys):
    assert privacy.main(["epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.01",
                         "--rounds", "100", "--delta", "1e-6", "--accountant", "rdp"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == pytest.approx(privacy.epsilon(_mech(rounds=100, accountant="rdp")))
    assert privacy.main(["calibrate", "--epsilon", "3", "--sampling-rate", "0.01", "--rounds",
                         "100", "--delta", "1e-6", "--accountant", "rdp"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] <= 3 and out["noise_multiplier"] > 0


def test_privacy_config_validation():
    with pytest.raises(ConfigError, match="noise_multiplier"):
        PrivacyConfig(noise_multiplier=-0.1)
    with pytest.raises(ConfigError, match="delta"):
        PrivacyConfig(delta=1.0)
    with pytest.raises(ConfigError, match="rdp"):
        PrivacyConfig(mechanism="tree_aggregation", accountant="pld")


@pytest.mark.parametrize("rounds", [1, 7, 300])
def test_memoized_pld_path_equals_the_pld_accountant(rounds):
    a, b = _mech(), _mech(noise_multiplier=1.7, clients_per_round=300)
    acct = pld_privacy_accountant.PLDAccountant()
    acct.compose(ev.ComposedDpEvent([privacy.phase_event(a, rounds), privacy.phase_event(b, 5)]))
    assert privacy.epsilon_of([(a, rounds), (b, 5)], 1e-6) == pytest.approx(
        acct.get_epsilon(1e-6), rel=1e-12)
