"""The utility plot of :mod:`bench.utility`: recall@1 against epsilon, one line per DP method,
horizontal lines for the references (raw pixels, random init, pretrained, non-private federated,
centralized). ``python -m bench.plot_utility bench/results/utility_fashion-mnist.json [OUT.png]``
redraws it from a result file.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DP_METHODS = {"dp_fedemb": ("DP-FedEmb", "tab:blue", "o", 0.97),
              "dp_fedavg": ("DP-FedAvg", "tab:orange", "s", 1.03)}  # x offsets of the CI bars
REFERENCES = {  # method -> (label, colour, line style); non-private rows of the DP methods too
    "raw_pixels": ("raw pixels", "grey", ":"),
    "random_init": ("random init", "tab:brown", ":"),
    "pretrained": ("pretrained (public only)", "black", "--"),
    "dp_fedemb": ("DP-FedEmb non-private (z=0)", "tab:blue", "-."),
    "dp_fedavg": ("DP-FedAvg non-private (z=0)", "tab:orange", "-."),
    "centralized": ("centralized non-private", "tab:green", "--"),
}


def plot(result: dict[str, Any], path: str, metric: str = "recall_at_1") -> None:
    """Write the PNG of one dataset's result (``rows`` as written by bench.utility)."""
    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = result["rows"]
    eps_all = []
    for method, (label, colour, marker, shift) in DP_METHODS.items():
        pts = sorted((r["target_epsilon"], r[metric]) for r in rows
                     if r["method"] == method and r.get("private") and r.get(metric) is not None)
        if pts:
            eps_all += [p[0] for p in pts]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour,
                    label=label)
            for r in rows:
                ci = r.get(metric + "_ci")
                if r["method"] == method and r.get("private") and ci:
                    ax.plot([r["target_epsilon"] * shift] * 2, ci, color=colour, alpha=0.35,
                            lw=3)
    for method, (label, colour, style) in REFERENCES.items():
        for r in rows:
            if r["method"] == method and not r.get("private") and r.get(metric) is not None:
                ax.axhline(r[metric], color=colour, ls=style, lw=1.2,
                           label=f"{label}: {r[metric]:.3f}")
    if eps_all:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(eps_all)))
        ax.set_xticklabels([f"{e:g}" for e in sorted(set(eps_all))])
    s = result.get("settings", {})
    ax.set_xlabel(f"epsilon (user-level, delta={s.get('delta')})")
    ax.set_ylabel("recall@1" if metric == "recall_at_1" else metric)
    ax.set_title(f"{result.get('dataset')}: {s.get('rounds')} rounds, "
                 f"{s.get('clients_per_round')} clients/round, {result.get('users')} users"
                 + (" (bars: 95% class-bootstrap CI)" if metric == "recall_at_1" else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m bench.plot_utility RESULT.json [OUT.png]", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        result = json.load(f)
    out = args[1] if len(args) > 1 else args[0].rsplit(".", 1)[0] + ".png"
    plot(result, out)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
