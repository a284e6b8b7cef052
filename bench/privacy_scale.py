"""Privacy at scale (issue #9): epsilon and calibrated noise as the population grows (accountant
only, no training).

``python -m bench.privacy_scale [--users 10000 100000 1000000] [--clients-per-round 100 1000]
[--rounds 1000 3000] [--noise-multipliers 0.5 1.0] [--target-epsilons 1 2 4 8] [--budget-s 240]``

For every population (k = 1: one user per virtual client, Poisson sampling, Gaussian with fixed
clipping, add/remove one user), clients per round and number of rounds, at delta = 1/(10 x users):

- the epsilon of each noise multiplier, with dpfedemb.privacy's accountant (PLD, the default;
  RDP beside it for comparison, cheap);
- the noise multiplier :func:`dpfedemb.privacy.calibrate_noise` finds for each target epsilon.

PLD gets slow at small noise multipliers, so a calibration is skipped (and said so) when the
epsilon at ``--slow-below`` (default 0.5) already meets the target: the answer is then below that
value, where one calibration can take minutes. Calibrations run smallest target epsilon first
(largest noise multipliers, the cheapest), cheapest first within a target, until ``--budget-s`` is
spent; the rest are reported as skipped for time.
Results: ``bench/results/privacy_scale.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Optional, Sequence

from bench import common
from dpfedemb import privacy


def mechanism(users: int, per_round: int, rounds: int, z: float, accountant: str = "pld"
              ) -> privacy.Mechanism:
    return privacy.Mechanism(mechanism="gaussian_fixed", noise_multiplier=float(z), clip_norm=1.0,
                             sampling="poisson", num_clients=users, clients_per_round=per_round,
                             users_per_client=1, rounds=rounds, delta=1.0 / (10 * users),
                             accountant=accountant)


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(prog="python -m bench.privacy_scale", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--clients-per-round", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--rounds", type=int, nargs="+", default=[1000, 3000])
    p.add_argument("--noise-multipliers", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--target-epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--slow-below", type=float, default=0.5,
                   help="skip a calibration whose answer is below this noise multiplier")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="time for calibrations; the rest are skipped and reported")
    p.add_argument("--results", default=common.results_path("privacy_scale"))
    a = p.parse_args(argv)

    settings = [(n, c, t) for n in a.users for c in a.clients_per_round for t in a.rounds
                if c <= n]
    zs = sorted(set(a.noise_multipliers) | {a.slow_below, 1.0})

    # 1. Epsilon of each noise multiplier (PLD and RDP).
    eps_rows: list[dict[str, Any]] = []
    eps_of: dict[tuple[int, int, int, float], float] = {}
    for n, c, t in settings:
        for z in zs:
            m = mechanism(n, c, t, z)
            s_pld, e_pld = _timed(privacy.epsilon, m)
            s_rdp, e_rdp = _timed(privacy.epsilon, dataclasses.replace(m, accountant="rdp"))
            eps_of[(n, c, t, z)] = e_pld
            if z in a.noise_multipliers:
                eps_rows.append({"users": n, "clients_per_round": c, "sampling_rate": c / n,
                                 "rounds": t, "noise_multiplier": z, "delta": m.delta,
                                 "epsilon_pld": e_pld, "epsilon_rdp": e_rdp,
                                 "seconds_pld": round(s_pld, 3), "seconds_rdp": round(s_rdp, 3)})
        print(f"epsilon: users {n} per round {c} rounds {t} done", flush=True)

    # 2. Calibration: smallest target epsilon first (larger noise multipliers: cheaper), and
    # within one target cheapest first (target / epsilon at z = 1; larger = smaller z = slower).
    tasks = sorted(((n, c, t, e) for n, c, t in settings for e in a.target_epsilons),
                   key=lambda k: (k[3], k[3] / max(eps_of[(k[0], k[1], k[2], 1.0)], 1e-12)))
    cal: dict[tuple[int, int, int, float], dict[str, Any]] = {}
    spent = 0.0
    for n, c, t, target in tasks:
        row: dict[str, Any] = {"users": n, "clients_per_round": c, "rounds": t,
                               "delta": 1.0 / (10 * n), "target_epsilon": target}
        if eps_of[(n, c, t, a.slow_below)] <= target:
            row.update(noise_multiplier=None,
                       skipped=f"answer < {a.slow_below} (epsilon at z={a.slow_below} is "
                               f"{eps_of[(n, c, t, a.slow_below)]:.3g}); PLD too slow there")
        elif spent > a.budget_s:
            row.update(noise_multiplier=None, skipped=f"time budget ({a.budget_s:.0f} s) spent")
        else:
            s, z = _timed(privacy.calibrate_noise, target, mechanism(n, c, t, 1.0))
            spent += s
            row.update(noise_multiplier=z, seconds=round(s, 2))
            print(f"calibrated users {n} per round {c} rounds {t} epsilon {target}: z={z:.4f} "
                  f"({s:.1f} s)", flush=True)
        cal[(n, c, t, target)] = row

    print()
    print(f"epsilon (PLD; RDP in brackets) at delta = 1/(10 users), k = 1, Poisson sampling")
    print(common.table(
        ["users", "per round", "q", "rounds", *[f"eps z={z:g}" for z in a.noise_multipliers]],
        [[n, c, f"{c / n:.0e}", t,
          *[f"{r['epsilon_pld']:.4g} [{r['epsilon_rdp']:.4g}]" for z in a.noise_multipliers
            for r in eps_rows if (r["users"], r["clients_per_round"], r["rounds"],
                                  r["noise_multiplier"]) == (n, c, t, z)]]
         for n, c, t in settings]))
    print()
    print("noise multiplier calibrated for each epsilon (PLD); '<x' = skipped, below x; "
          "'time' = skipped for the time budget")

    def cell(r: dict[str, Any]) -> str:
        if r["noise_multiplier"] is not None:
            return f"{r['noise_multiplier']:.4f}"
        return f"<{a.slow_below:g}" if r["skipped"].startswith("answer") else "time"
    print(common.table(
        ["users", "per round", "rounds", *[f"z for eps={e:g}" for e in a.target_epsilons]],
        [[n, c, t, *[cell(cal[(n, c, t, e)]) for e in a.target_epsilons]]
         for n, c, t in settings]))
    skipped = [r for r in cal.values() if r["noise_multiplier"] is None]
    print(f"\n{len(skipped)} of {len(cal)} calibrations skipped; calibration time {spent:.0f} s")

    result = common.envelope("privacy_scale", argv, started)
    result.update({
        "setup": {"users": a.users, "clients_per_round": a.clients_per_round, "rounds": a.rounds,
                  "noise_multipliers": a.noise_multipliers, "target_epsilons": a.target_epsilons,
                  "delta": "1 / (10 * users)", "users_per_client": 1, "sampling": "poisson",
                  "mechanism": "gaussian_fixed", "neighboring_relation": privacy.ADD_REMOVE_USER,
                  "accountant": "pld (dp-accounting defaults, via dpfedemb.privacy); rdp beside",
                  "slow_below": a.slow_below, "budget_s": a.budget_s},
        "epsilon": eps_rows,
        "calibration": [cal[(n, c, t, e)] for n, c, t in settings for e in a.target_epsilons],
        "calibration_seconds": round(spent, 1), "skipped_calibrations": len(skipped)})
    common.save(a.results, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
