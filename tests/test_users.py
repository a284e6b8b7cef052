"""User simulation: each image exactly one user, seeded, Dirichlet skew."""
import numpy as np

from dpfedemb.config import SimulationConfig
from dpfedemb.data.users import simulate_users


def _labels(n=3000, classes=10):
    return np.random.default_rng(1).integers(0, classes, n)


def test_every_image_has_exactly_one_user_and_sizes_near_mean():
    y = _labels()
    owner = simulate_users(y, SimulationConfig(mean_examples_per_user=20, seed=3))
    assert owner.shape == y.shape and (owner >= 0).all()
    counts = np.bincount(owner)
    assert len(counts) == 150 and counts.min() >= 1 and counts.sum() == len(y)


def test_same_seed_same_split_other_seed_differs():
    y = _labels()
    a = simulate_users(y, SimulationConfig(seed=5))
    assert np.array_equal(a, simulate_users(y, SimulationConfig(seed=5)))
    assert not np.array_equal(a, simulate_users(y, SimulationConfig(seed=6)))


def _mean_top_class_share(y, owner):
    shares = []
    for u in np.unique(owner):
        c = np.bincount(y[owner == u], minlength=10)
        shares.append(c.max() / c.sum())
    return float(np.mean(shares))


def test_smaller_alpha_gives_more_class_skew():
    y = _labels(6000)
    skewed = _mean_top_class_share(y, simulate_users(y, SimulationConfig(dirichlet_alpha=0.1)))
    iid = _mean_top_class_share(y, simulate_users(y, SimulationConfig(dirichlet_alpha=100.0)))
    assert skewed > 0.6 and iid < 0.4 and skewed > iid + 0.25
