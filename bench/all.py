"""``make bench``: every benchmark in sequence (one heavy TensorFlow job at a time), each saving
its JSON (and plots) under bench/results/."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__)
    p.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the scripts run")
    a = p.parse_args()
    runs = [
        ["bench.partition", "--records", "20000" if a.quick else "100000"],
        ["bench.train"] + (["--rounds", "3"] if a.quick else []),
        ["bench.accountant"],
        ["bench.privacy_scale"],
        ["bench.utility", "--dataset", "fashion-mnist", "--fashion-mnist-dir",
         a.fashion_mnist_dir] + (["--quick"] if a.quick else []),
        ["bench.utility", "--dataset", "omniglot"] + (["--quick"] if a.quick else []),
    ]
    failed = []
    for argv in runs:
        t0 = time.time()
        print(f"== python -m {' '.join(argv)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", *argv])
        print(f"== {argv[0]}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(argv[0])
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
