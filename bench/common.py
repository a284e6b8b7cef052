"""Helpers the benchmarks share: where results go, what machine they ran on, timing, tables."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_path(name: str) -> str:
    return os.path.join(RESULTS_DIR, f"{name}.json")


def machine() -> dict[str, Any]:
    """Platform, CPU count and load (the development machines are shared and noisy)."""
    return {"platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def envelope(name: str, argv: Sequence[str] | None, started: float) -> dict[str, Any]:
    """The fields every result file starts with: date, command line, machine, wall time."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {"benchmark": name,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "-m", f"bench.{name}", *args]),
            "machine": machine(), "wall_seconds": round(time.perf_counter() - started, 1)}


def save(path: str, result: dict[str, Any]) -> None:
    from dpfedemb import storage
    storage.write_json_atomic(path, result)
    print(f"saved {path}")


def timed_repeats(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Run ``fn`` ``repeats`` times; (seconds of each run, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (right-aligned numbers)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])
