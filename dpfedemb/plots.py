"""Report figures as PNG data URIs (matplotlib's Agg canvas: no display, no global pyplot state)."""
from __future__ import annotations

import base64
import io
import math
from typing import Any, Mapping, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def data_uri(fig: Figure) -> str:
    """The figure as a base64 ``data:image/png`` URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _number(v: Any) -> Optional[float]:
    """A finite float from a number or numeric string, else None ("inf" is not plotted)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def series(rounds: Any, key: str) -> tuple[list[float], list[float]]:
    """(round, value) points of ``key`` over a ``rounds`` list, skipping missing or non-finite."""
    xs, ys = [], []
    for pos, r in enumerate(rounds if isinstance(rounds, list) else []):
        if not isinstance(r, Mapping):
            continue
        y = _number(r.get(key))
        x = _number(r.get("round", pos + 1))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def training_curves(training: Mapping[str, Mapping]) -> Optional[str]:
    """Loss and epsilon against rounds for every training metrics file; None without data."""
    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 2)
    drawn = False
    for ax, key, label in ((axes[0], "loss", "training loss"), (axes[1], "epsilon", "epsilon")):
        for name, tm in training.items():
            xs, ys = series(tm.get("rounds") if isinstance(tm, Mapping) else None, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=name)
                drawn = True
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return data_uri(fig) if drawn else None


def recall_chart(metrics: Mapping) -> Optional[str]:
    """recall@1 with its 95% interval, per model and subset."""
    models = metrics.get("model_order") or list(metrics.get("models", {}))
    subsets = [s for s in ("all", "seen", "unseen")
               if any(s in metrics["models"][m].get("subsets", {}) for m in models)]
    if not models or not subsets:
        return None
    fig = Figure(figsize=(max(5, 1.4 * len(models) * len(subsets) / 2 + 3), 3.4))
    ax = fig.subplots()
    width = 0.8 / len(subsets)
    for k, s in enumerate(subsets):
        xs, ys, err = [], [], [[], []]
        for i, m in enumerate(models):
            r = metrics["models"][m].get("subsets", {}).get(s)
            if not r or r.get("recall_at_1") is None:
                continue
            y, ci = r["recall_at_1"], r.get("recall_at_1_ci") or [r["recall_at_1"]] * 2
            xs.append(i + (k - (len(subsets) - 1) / 2) * width)
            ys.append(y)
            err[0].append(max(0.0, y - ci[0]))
            err[1].append(max(0.0, ci[1] - y))
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=f"{s} classes")
    ax.set_xticks(range(len(models)), models)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("recall@1 (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return data_uri(fig)


def similarity_histograms(metrics: Mapping, subset: str = "all") -> Optional[str]:
    """Genuine vs impostor cosine similarity densities, one panel per model."""
    edges = np.asarray(metrics.get("protocol", {}).get("histogram_bin_edges") or [], float)
    models = [m for m in (metrics.get("model_order") or list(metrics.get("models", {})))
              if subset in metrics["models"][m].get("subsets", {})]
    if len(edges) < 2 or not models:
        return None
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    widths = np.diff(edges)
    for ax, m in zip(axes, models):
        hist = metrics["models"][m]["subsets"][subset].get("similarity_histogram", {})
        for kind, color in (("genuine", "tab:green"), ("impostor", "tab:red")):
            counts = np.asarray(hist.get(kind) or [], float)
            if len(counts) == len(widths) and counts.sum() > 0:
                ax.stairs(counts / counts.sum() / widths, edges, label=kind, color=color,
                          fill=True, alpha=0.35)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=8)
    for ax in axes[len(models):]:
        ax.set_visible(False)
    return data_uri(fig)
