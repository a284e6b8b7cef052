"""Accountant cost: seconds for epsilon after many rounds (PLD and RDP) and for one calibration.

``python -m bench.accountant [--rounds 10000] [--users 1000000] [--clients-per-round 1000]
[--noise-multiplier 1.0] [--target-epsilon 2] [--repeats 3]``

One user per virtual client, Poisson sampling, Gaussian with fixed clipping, delta = 1/(10 x
users) unless ``--delta``. Each measurement is repeated ``--repeats`` times (fresh accountant each
time); the median is reported, with min and max. Also timed: epsilon after 1, 10, 100, 1000
rounds (PLD), since :func:`dpfedemb.train.run_training` computes the epsilon so far after every
round. Results: ``bench/results/accountant.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Optional, Sequence

from bench import common
from dpfedemb import privacy


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(prog="python -m bench.accountant", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10_000)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--clients-per-round", type=int, default=1000)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=None, help="default 1 / (10 * users)")
    p.add_argument("--target-epsilon", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", default=common.results_path("accountant"))
    a = p.parse_args(argv)
    delta = a.delta if a.delta is not None else 1.0 / (10 * a.users)
    base = privacy.Mechanism(mechanism="gaussian_fixed", noise_multiplier=a.noise_multiplier,
                             clip_norm=1.0, sampling="poisson", num_clients=a.users,
                             clients_per_round=a.clients_per_round, users_per_client=1,
                             rounds=a.rounds, delta=delta, accountant="pld")
    rdp = dataclasses.replace(base, accountant="rdp")

    cases: list[tuple[str, Callable[[], Any]]] = [
        (f"epsilon_pld_{a.rounds}_rounds", lambda: privacy.epsilon(base)),
        (f"epsilon_rdp_{a.rounds}_rounds", lambda: privacy.epsilon(rdp)),
        (f"calibrate_pld_eps{a.target_epsilon:g}_{a.rounds}_rounds",
         lambda: privacy.calibrate_noise(a.target_epsilon, base)),
        (f"calibrate_rdp_eps{a.target_epsilon:g}_{a.rounds}_rounds",
         lambda: privacy.calibrate_noise(a.target_epsilon, rdp)),
    ]
    for t in (1, 10, 100, 1000):
        if t < a.rounds:
            cases.append((f"epsilon_pld_{t}_rounds", lambda t=t: privacy.epsilon(base, t)))

    rows: dict[str, dict[str, Any]] = {}
    for name, fn in cases:
        times, value = common.timed_repeats(fn, a.repeats)
        rows[name] = {"median_s": round(common.median(times), 4), "min_s": round(min(times), 4),
                      "max_s": round(max(times), 4), "repeats": a.repeats,
                      "value": float(value),
                      "value_is": "noise_multiplier" if name.startswith("calibrate") else "epsilon"}
        print(f"{name}: median {rows[name]['median_s']:.3f} s -> {rows[name]['value_is']} "
              f"{float(value):.4g}", flush=True)

    print()
    print(f"users {a.users}, {a.clients_per_round} per round (q = {base.sampling_rate:g}), "
          f"z = {a.noise_multiplier}, delta = {delta:g}, {a.repeats} repeats")
    print(common.table(["measurement", "median s", "min s", "max s", "value"],
                       [[n, r["median_s"], r["min_s"], r["max_s"],
                         f"{r['value_is']} {r['value']:.4g}"] for n, r in rows.items()]))
    pld_key, rdp_key = f"epsilon_pld_{a.rounds}_rounds", f"epsilon_rdp_{a.rounds}_rounds"
    ratio = rows[pld_key]["median_s"] / max(rows[rdp_key]["median_s"], 1e-9)
    print(f"\nPLD / RDP time for epsilon after {a.rounds} rounds: {ratio:.1f}x")

    result = common.envelope("accountant", argv, started)
    result.update({
        "setup": {"users": a.users, "clients_per_round": a.clients_per_round,
                  "sampling_rate": base.sampling_rate, "noise_multiplier": a.noise_multiplier,
                  "rounds": a.rounds, "delta": delta, "target_epsilon": a.target_epsilon,
                  "repeats": a.repeats, "mechanism": "gaussian_fixed", "sampling": "poisson",
                  "users_per_client": 1},
        "results": rows, "pld_over_rdp_time_epsilon": round(ratio, 2)})
    common.save(a.results, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
