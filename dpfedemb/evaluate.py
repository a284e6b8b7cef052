"""Embedding evaluation: retrieval recall@1 and verification TAR@FAR with class-bootstrap
confidence intervals, for every model compared and for raw pixels; and its CLI.

Protocol (the same code for every model; restated in metrics.json and in the reports):

- Similarity is cosine: embeddings are L2-normalized here, whatever a model returns.
- Each subset (``all``, ``seen``, ``unseen`` classes) is evaluated on its own: queries, gallery and
  pairs are restricted to the subset's images.
- recall@1: every image is a query against all other images of the subset. Queries whose class has
  a single image cannot be answered; they are excluded and counted. Ties: a query is a hit only when
  its most similar same-class image is strictly more similar than its most similar other-class
  image, so an exact tie counts as a miss (pessimistic, and independent of the order of the data).
- TAR@FAR: genuine pairs are all unordered pairs of distinct images of one class. Impostor pairs
  are all pairs of different classes or, above ``max_impostor_pairs``, that many distinct pairs
  drawn uniformly with a fixed seed (the same pairs for every model). The threshold is the (1-FAR)
  quantile of impostor similarities: the smallest impostor similarity with at most FAR of the
  impostor pairs strictly above it. TAR is the fraction of genuine pairs strictly above it. With
  fewer than 1/FAR impostor pairs the FAR is not resolved (``resolved: false``).
- 95% intervals: percentile bootstrap over classes (resample the subset's classes with replacement,
  fixed seed, the same resamples for every model). recall@1 is recomputed exactly on the resampled
  queries. TAR is recomputed from similarity histograms (bins of width 0.001): a class's genuine
  pairs weigh its multiplicity, impostor pairs of classes (a, b) the product of theirs (copies of one
  class are not impostors of each other); the threshold is re-estimated in every resample at bin
  resolution, so the interval includes threshold uncertainty up to that resolution.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from dpfedemb import storage
from dpfedemb.config import ConfigError, ImageSpec
from dpfedemb.data import records, schema

FARS = (1e-3, 1e-1)
HIST_BINS = 2000          # similarity histogram bins on [-1, 1] used by the TAR bootstrap
PLOT_BINS = 50            # coarser bins stored in metrics.json for the reports
RAW_PIXELS = "raw_pixels"
SUBSETS = ("all", "seen", "unseen")
SCHEMA_VERSION = 1

TIE_RULE = ("a query is a hit only if its nearest same-class image is strictly more similar than its "
            "nearest other-class image; exact ties count as misses")


class EvaluationError(ValueError):
    """Evaluation cannot run: the message names the model or input and the fix."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Evaluation parameters shared by every model compared."""

    fars: tuple[float, ...] = FARS
    max_impostor_pairs: int = 2_000_000
    bootstrap_resamples: int = 200
    confidence: float = 0.95
    seed: int = 0
    chunk: int = 1024

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"invalid {name}={getattr(self, name)!r}: must be {allowed}")
        check(len(self.fars) > 0 and all(0 < f < 1 for f in self.fars), "fars",
              "a non-empty tuple of numbers in (0, 1)")
        check(self.max_impostor_pairs >= 1, "max_impostor_pairs", "an integer >= 1")
        check(self.bootstrap_resamples >= 1, "bootstrap_resamples", "an integer >= 1")
        check(0 < self.confidence < 1, "confidence", "a number in (0, 1)")
        check(self.seed >= 0, "seed", "an integer >= 0")
        check(self.chunk >= 1, "chunk", "an integer >= 1")


def far_key(far: float) -> str:
    """The metrics.json key of a FAR (``0.001``, ``0.1``)."""
    return format(far, "g")


# ---------------------------------------------------------------------------------------- metrics

def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows flattened to float32 and scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def recall_hits(embeddings: np.ndarray, labels: np.ndarray, chunk: int = 1024
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (hit, usable). ``usable`` is False for a class with one image; ties are misses."""
    labels = np.asarray(labels).reshape(-1)
    e = l2_normalize(embeddings)
    if len(e) != len(labels):
        raise ValueError(f"{len(e)} embeddings but {len(labels)} labels")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    usable = counts[inverse] > 1
    hit = np.zeros(len(e), bool)
    for start in range(0, len(e), chunk):
        idx = np.arange(start, min(start + chunk, len(e)))
        idx = idx[usable[idx]]
        if not len(idx):
            continue
        sims = e[idx] @ e.T
        sims[np.arange(len(idx)), idx] = -np.inf  # never retrieve the query itself
        same = inverse[idx, None] == inverse[None, :]
        best_same = np.where(same, sims, -np.inf).max(axis=1)
        best_other = np.where(same, -np.inf, sims).max(axis=1)
        hit[idx] = best_same > best_other
    return hit, usable


def recall_at_1(embeddings: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> tuple[float, int]:
    """Fraction of queries whose nearest other image (cosine) has the query's label.

    Queries whose class has a single image are excluded; returns (recall, queries used), recall NaN
    when no query is usable. A tie between a same-class and an other-class neighbour is a miss.
    """
    hit, usable = recall_hits(embeddings, labels, chunk)
    used = int(usable.sum())
    return (float(hit[usable].mean()) if used else float("nan")), used


def pair_counts(cls: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor) numbers of unordered pairs for class indices ``cls``."""
    n = len(cls)
    counts = np.bincount(cls) if n else np.zeros(0, np.int64)
    genuine = int((counts * (counts - 1) // 2).sum())
    return genuine, n * (n - 1) // 2 - genuine


def _all_impostors(cls: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(cls)
    ii, jj = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        cols = np.arange(start, n)
        r, c = np.nonzero((cls[rows, None] != cls[None, cols]) & (cols[None, :] > rows[:, None]))
        ii.append(rows[r])
        jj.append(cols[c])
    return np.concatenate(ii), np.concatenate(jj)


def _sample_impostors(cls: np.ndarray, k: int, total: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``k`` distinct impostor pairs (i < j) drawn uniformly; needs ``total > k``."""
    n = len(cls)
    share = total / float(n * n)  # fraction of the n*n cells that are impostor pairs with i < j
    keys = np.zeros(0, np.int64)
    while len(keys) < k:
        draw = min(int((k - len(keys)) * 1.2 / share) + 64, 4_000_000)
        cand = rng.integers(0, n * n, size=draw, dtype=np.int64)
        i, j = np.divmod(cand, n)
        keys = np.union1d(keys, cand[(i < j) & (cls[i] != cls[j])])
    keys = np.sort(rng.choice(keys, size=k, replace=False))
    return np.divmod(keys, n)


def impostor_pairs(cls: np.ndarray, max_pairs: int, rng: np.random.Generator, chunk: int = 1024
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Impostor index pairs (i < j): all of them, or ``max_pairs`` sampled; and their total."""
    _, total = pair_counts(cls)
    if total <= max_pairs:
        i, j = _all_impostors(cls, chunk)
    else:
        i, j = _sample_impostors(cls, max_pairs, total, rng)
    return i, j, total


def pair_similarities(e: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Cosine similarities of normalized rows ``e[i]`` and ``e[j]``, in chunks."""
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), chunk):
        out[s:s + chunk] = np.einsum("nd,nd->n", e[i[s:s + chunk]], e[j[s:s + chunk]])
    return out


def far_threshold(impostor_sims: np.ndarray, far: float) -> float:
    """The smallest impostor similarity with at most ``far`` of impostors strictly above it."""
    s = np.asarray(impostor_sims, np.float32).reshape(-1)
    n = len(s)
    if not n:
        return float("nan")
    k = min(int(math.floor(far * n + 1e-9)), n - 1)  # impostors allowed strictly above
    return float(np.partition(s, n - 1 - k)[n - 1 - k])


def to_bins(sims: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """Histogram bin of each similarity on [-1, 1] (values outside are clipped)."""
    b = np.floor((np.asarray(sims, np.float64) + 1.0) * (bins / 2.0)).astype(np.int64)
    return np.clip(b, 0, bins - 1)


def genuine_stats(e: np.ndarray, cls: np.ndarray, thresholds: Sequence[float], chunk: int = 1024
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Over all genuine pairs: per-class histograms [K, HIST_BINS] and counts above each threshold."""
    n = len(e)
    k = int(cls.max()) + 1 if n else 0
    hist = np.zeros(k * HIST_BINS, np.int64)
    thr = np.asarray(thresholds, np.float32)
    above = np.zeros(len(thr), np.int64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        cols = np.arange(start, n)
        sims = e[rows] @ e[cols].T
        r, c = np.nonzero((cls[rows, None] == cls[None, cols]) & (cols[None, :] > rows[:, None]))
        s = sims[r, c]
        hist += np.bincount(cls[rows[r]] * HIST_BINS + to_bins(s), minlength=k * HIST_BINS)
        above += (s[:, None] > thr[None, :]).sum(axis=0)
    return hist.reshape(k, HIST_BINS), above


# -------------------------------------------------------------------------------------- bootstrap

def class_multiplicities(num_classes: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, K] counts of each class in resamples of the classes with replacement."""
    m = np.zeros((resamples, num_classes), np.int64)
    if num_classes:
        draws = rng.integers(0, num_classes, size=(resamples, num_classes))
        np.add.at(m, (np.arange(resamples)[:, None], draws), 1)
    return m


def bootstrap_recall(hit: np.ndarray, usable: np.ndarray, cls: np.ndarray, m: np.ndarray
                     ) -> np.ndarray:
    """recall@1 of every class resample (NaN where a resample has no usable query)."""
    k = m.shape[1]
    hits_c = np.bincount(cls[usable], weights=hit[usable].astype(np.float64), minlength=k)
    queries_c = np.bincount(cls[usable], minlength=k).astype(np.float64)
    num, den = m @ hits_c, m @ queries_c
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def bootstrap_tar(gen_hist: np.ndarray, imp_a: np.ndarray, imp_b: np.ndarray, imp_bins: np.ndarray,
                  fars: Sequence[float], m: np.ndarray) -> np.ndarray:
    """[resamples, len(fars)] TAR from class-weighted genuine and impostor histograms."""
    k, nb = gen_hist.shape
    out = np.full((len(m), len(fars)), np.nan)
    if not len(imp_a) or not k:
        return out
    keys, cnt = np.unique((imp_a * k + imp_b) * nb + imp_bins, return_counts=True)
    pab, pbin = np.divmod(keys, nb)
    pa, pb = np.divmod(pab, k)
    gen_all = m.astype(np.float64) @ gen_hist
    for b in range(len(m)):
        imp = np.bincount(pbin, weights=m[b, pa] * m[b, pb] * cnt, minlength=nb)
        gen = gen_all[b]
        ti, tg = imp.sum(), gen.sum()
        if ti <= 0 or tg <= 0:
            continue
        imp_above, gen_above = ti - np.cumsum(imp), tg - np.cumsum(gen)
        for f, far in enumerate(fars):
            t = int(np.argmax(imp_above <= far * ti + 1e-9))
            out[b, f] = gen_above[t] / tg
    return out


def percentile_ci(values: np.ndarray, level: float) -> Optional[list[float]]:
    """Percentile interval of the finite bootstrap values, or None when there are none."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------- subsets

@dataclasses.dataclass
class SubsetPlan:
    """One subset's images, classes, impostor pairs and class resamples (shared by all models)."""

    name: str
    index: np.ndarray
    classes: np.ndarray
    cls: np.ndarray
    imp_i: np.ndarray
    imp_j: np.ndarray
    imp_total: int
    multiplicities: np.ndarray


def plan_subset(name: str, labels: np.ndarray, keep: np.ndarray, protocol: Protocol) -> SubsetPlan:
    """Fix a subset's impostor pairs and bootstrap resamples from the protocol's seed."""
    index = np.nonzero(keep)[0]
    classes, cls = np.unique(labels[index], return_inverse=True)
    cls = cls.reshape(-1).astype(np.int64)
    rng = np.random.default_rng([protocol.seed, SUBSETS.index(name)])
    i, j, total = impostor_pairs(cls, protocol.max_impostor_pairs, rng, protocol.chunk)
    m = class_multiplicities(len(classes), protocol.bootstrap_resamples, rng)
    return SubsetPlan(name, index, classes, cls, i, j, total, m)


def _coarse(counts: np.ndarray) -> list[int]:
    return [int(x) for x in counts.reshape(PLOT_BINS, -1).sum(axis=1)]


def subset_metrics(embeddings: np.ndarray, plan: SubsetPlan, protocol: Protocol) -> dict:
    """Every number for one model on one subset (see the module docstring for the protocol)."""
    e = l2_normalize(embeddings)
    cls = plan.cls
    hit, usable = recall_hits(e, cls, protocol.chunk)
    used = int(usable.sum())
    imp = pair_similarities(e, plan.imp_i, plan.imp_j)
    thresholds = [far_threshold(imp, f) for f in protocol.fars]
    gen_hist, above = genuine_stats(e, cls, thresholds, protocol.chunk)
    n_gen = int(gen_hist.sum())
    imp_bins = to_bins(imp)
    tar_boot = bootstrap_tar(gen_hist, cls[plan.imp_i], cls[plan.imp_j], imp_bins, protocol.fars,
                             plan.multiplicities)
    tar = {}
    for f, far in enumerate(protocol.fars):
        ok = len(imp) > 0 and n_gen > 0
        tar[far_key(far)] = {
            "tar": float(above[f] / n_gen) if ok else None,
            "ci": percentile_ci(tar_boot[:, f], protocol.confidence) if ok else None,
            "threshold": thresholds[f] if ok else None,
            "achieved_far": float((imp > thresholds[f]).mean()) if ok else None,
            "resolved": bool(math.floor(far * len(imp) + 1e-9) >= 1),
        }
    counts = np.bincount(cls, minlength=len(plan.classes))
    return {
        "examples": int(len(e)), "classes": int(len(plan.classes)),
        "single_image_classes": int((counts == 1).sum()),
        "queries": used, "excluded_queries": int(len(e) - used),
        "recall_at_1": float(hit[usable].mean()) if used else None,
        "recall_at_1_ci": percentile_ci(bootstrap_recall(hit, usable, cls, plan.multiplicities),
                                        protocol.confidence) if used else None,
        "tar_at_far": tar,
        "genuine_pairs": n_gen, "impostor_pairs_total": int(plan.imp_total),
        "impostor_pairs_used": int(len(imp)), "impostor_pairs_sampled": bool(len(imp) < plan.imp_total),
        "similarity_histogram": {"genuine": _coarse(gen_hist.sum(axis=0)),
                                 "impostor": _coarse(np.bincount(imp_bins, minlength=HIST_BINS))},
    }


def subset_masks(labels: np.ndarray, seen: Optional[Sequence[int]]
                 ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Masks of the available subsets and a description of every subset (with a note if empty)."""
    masks = {"all": np.ones(len(labels), bool)}
    info: dict[str, dict] = {}
    if seen is None:
        note = "seen/unseen split unknown: give --train-classes or --card"
        info["seen"] = info["unseen"] = {"available": False, "note": note}
    else:
        in_seen = np.isin(labels, np.asarray(list(seen), np.int64))
        for name, mask, empty in (("seen", in_seen, "none: no evaluation class was seen in training"),
                                  ("unseen", ~in_seen, "none: every evaluation class "
                                   "was seen in training")):
            if mask.any():
                masks[name] = mask
            else:
                info[name] = {"available": False, "note": empty}
    for name, mask in masks.items():
        info[name] = {"available": True, "examples": int(mask.sum()),
                      "classes": sorted(int(c) for c in np.unique(labels[mask]))}
    return masks, {name: info[name] for name in SUBSETS}


# ----------------------------------------------------------------------------------------- models

def infer_spec(files: Sequence[str]) -> ImageSpec:
    """The image spec of the first record (grey stays 1 channel, colour becomes 3)."""
    for rec in records.iter_records(files):
        r = schema.parse_record(rec, max_image_side=100_000, allowed_channels=(1, 2, 3, 4))
        return ImageSpec(r.height, r.width, 1 if r.channels in (1, 2) else 3)
    raise EvaluationError(f"the evaluation files {list(files)[:3]} hold no records")


def check_model_dirs(models: Sequence[tuple[str, str]]) -> None:
    """Fail before any work when a model directory is missing."""
    for name, path in models:
        if not storage.exists(path):
            raise EvaluationError(f"model {name!r} not found at {path}: check --model {name}=DIR "
                                  "(a SavedModel directory with model.json)")


def embed_with_model(name: str, path: str, load_images: Callable[[ImageSpec], np.ndarray]
                     ) -> tuple[np.ndarray, dict]:
    """Embed the evaluation images with the model at ``path``; errors name the model and path."""
    try:
        from dpfedemb import model as model_lib
        embedder = model_lib.load_embedder(path)
    except Exception as e:
        raise EvaluationError(f"cannot load model {name!r} from {path}: {type(e).__name__}: {e} "
                              "(expected a SavedModel directory with model.json)") from e
    spec = embedder.image_spec
    images = load_images(spec)
    try:
        emb = np.asarray(embedder.embed(images), np.float32)
    except Exception as e:
        raise EvaluationError(f"model {name!r} at {path} failed to embed the evaluation images "
                              f"(converted to its input {spec.height}x{spec.width}x{spec.channels}): "
                              f"{type(e).__name__}: {e}") from e
    if emb.ndim != 2 or len(emb) != len(images) or not np.isfinite(emb).all():
        raise EvaluationError(f"model {name!r} at {path} returned embeddings of shape {emb.shape} "
                              f"for {len(images)} images (expected [N, D], all finite)")
    return emb, {"kind": "model", "path": path, "embedding_dim": int(emb.shape[1]),
                 "image": dataclasses.asdict(spec)}


def raw_pixel_embeddings(images: np.ndarray) -> tuple[np.ndarray, dict]:
    """Raw pixels as embeddings: the floor every learned embedding should beat."""
    emb = images.reshape(len(images), -1).astype(np.float32)
    spec = {"height": int(images.shape[1]), "width": int(images.shape[2]),
            "channels": int(images.shape[3])}
    return emb, {"kind": "raw_pixels", "path": None, "embedding_dim": int(emb.shape[1]),
                 "image": spec}


def protocol_description(protocol: Protocol) -> dict:
    return {"similarity": "cosine", "subsets": "each subset evaluated on its own images only",
            "recall_ties": TIE_RULE, "single_image_classes": "excluded from queries and counted",
            "fars": [far_key(f) for f in protocol.fars],
            "threshold": "(1-FAR) quantile of impostor similarities; TAR counts genuine pairs "
                         "strictly above it",
            "max_impostor_pairs": protocol.max_impostor_pairs,
            "impostor_sampling": "all impostor pairs, or max_impostor_pairs distinct pairs drawn "
                                 "uniformly with the seed (the same pairs for every model)",
            "bootstrap": {"unit": "class", "resamples": protocol.bootstrap_resamples,
                          "confidence": protocol.confidence, "seed": protocol.seed,
                          "tar": "class-weighted histograms, bin width 0.001, threshold "
                                 "re-estimated per resample"},
            "histogram_bin_edges": [float(x) for x in np.linspace(-1, 1, PLOT_BINS + 1)]}


def evaluate(data_pattern: str, models: Sequence[tuple[str, str]], *,
             seen_classes: Optional[Sequence[int]] = None, seen_source: Optional[str] = None,
             image_spec: Optional[ImageSpec] = None, protocol: Protocol = Protocol()) -> dict:
    """Evaluate raw pixels and every ``(name, model_dir)`` on the records matching the glob."""
    names = [n for n, _ in models]
    if len(set(names)) != len(names) or RAW_PIXELS in names:
        raise EvaluationError(f"model names must be distinct and not {RAW_PIXELS!r}: got {names}")
    check_model_dirs(models)
    files = records.files_of(data_pattern)
    base = image_spec or infer_spec(files)
    cache: dict[ImageSpec, np.ndarray] = {}

    def load_images(spec: ImageSpec) -> np.ndarray:
        if spec not in cache:
            cache[spec] = records.load_arrays(files, spec)[0]
        return cache[spec]

    images, labels, _ = records.load_arrays(files, base)
    cache[base] = images
    if not len(labels):
        raise EvaluationError(f"{data_pattern} holds no records to evaluate")
    masks, subsets = subset_masks(labels, seen_classes)
    plans = [plan_subset(name, labels, mask, protocol) for name, mask in masks.items()]
    out_models: dict[str, dict] = {}
    for name, path in [(RAW_PIXELS, None)] + list(models):
        emb, info = raw_pixel_embeddings(images) if path is None else \
            embed_with_model(name, path, load_images)
        info["subsets"] = {p.name: subset_metrics(emb[p.index], p, protocol) for p in plans}
        out_models[name] = info
    return {"schema_version": SCHEMA_VERSION, "protocol": protocol_description(protocol),
            "data": {"pattern": data_pattern, "files": [f.rsplit("/", 1)[-1] for f in files],
                     "examples": int(len(labels)), "classes": int(len(np.unique(labels))),
                     "image": dataclasses.asdict(base)},
            "seen_classes": None if seen_classes is None else sorted(int(c) for c in seen_classes),
            "seen_classes_source": seen_source, "subsets": subsets,
            "model_order": list(out_models), "models": out_models}


# -------------------------------------------------------------------------------------------- CLI

def parse_model(text: str) -> tuple[str, str]:
    """``NAME=DIR`` -> (name, dir)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"invalid --model {text!r}: expected NAME=MODEL_DIR, "
                                         "e.g. trained=/runs/1/model")
    return name.strip(), path.strip()


def parse_classes(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]."""
    try:
        return sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --train-classes {text!r}: expected comma-"
                                         "separated integers, e.g. 0,1,2") from None


def card_info(path: str) -> tuple[list[int], ImageSpec]:
    """Seen classes (the private split's) and the image spec from a dataset card.json."""
    card = storage.read_json(path)
    try:
        classes = [int(c) for c in card["splits"]["private"]["classes"]]
    except (KeyError, TypeError, ValueError):
        raise EvaluationError(f"card {path} has no splits.private.classes: give --train-classes "
                              "instead") from None
    image = card.get("image") if isinstance(card, dict) else None
    spec = ImageSpec(**image) if isinstance(image, dict) else ImageSpec()
    return classes, spec


def read_optional_json(path: Optional[str], what: str) -> Optional[dict]:
    """A JSON object from ``path`` (None when no path); anything else is an error naming it."""
    if not path:
        return None
    obj = storage.read_json(path)
    if not isinstance(obj, dict):
        raise EvaluationError(f"{what} {path} must hold a JSON object, found {type(obj).__name__}")
    return obj


def training_metrics_label(text: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the file, or its folder for ``metrics.json``)."""
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name:
        return name, path
    parts = text.rstrip("/").split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    return (parts[-2] if stem == "metrics" and len(parts) > 1 else stem), text


def _finite(obj: Any) -> Any:
    """Our numbers with NaN/inf replaced by None (metrics.json stays strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpfedemb.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="glob of the evaluation TFRecord files")
    p.add_argument("--model", action="append", default=[], type=parse_model, metavar="NAME=DIR",
                   help="a model to evaluate (repeatable); raw pixels are always included")
    p.add_argument("--output", required=True, help="folder for metrics.json, report.md, report.html")
    seen = p.add_mutually_exclusive_group()
    seen.add_argument("--train-classes", type=parse_classes, help="classes seen in training: 0,1,2")
    seen.add_argument("--card", help="dataset card.json: its private split's classes are 'seen'")
    p.add_argument("--privacy", help="privacy.json of the training run (rendered unchanged)")
    p.add_argument("--partition-stats", help="stats.json of the partition step")
    p.add_argument("--training-metrics", nargs="+", default=[], metavar="[NAME=]METRICS_JSON",
                   help="training metrics files ({'rounds': [{'round', 'loss', 'epsilon'}]})")
    p.add_argument("--seed", type=int, default=0, help="seed of impostor sampling and bootstrap")
    p.add_argument("--max-impostor-pairs", type=int, default=2_000_000)
    p.add_argument("--bootstrap-resamples", type=int, default=200)
    return p


def run(args: argparse.Namespace) -> dict[str, str]:
    """Evaluate, write metrics.json and the reports; return the written paths."""
    from dpfedemb import report

    protocol = Protocol(max_impostor_pairs=args.max_impostor_pairs,
                        bootstrap_resamples=args.bootstrap_resamples, seed=args.seed)
    seen, spec = args.train_classes, None
    source = "--train-classes" if seen is not None else None
    if args.card:
        seen, spec = card_info(args.card)
        source = f"card {args.card} (private split)"
    privacy = read_optional_json(args.privacy, "privacy file")
    stats = read_optional_json(args.partition_stats, "partition stats")
    training: dict[str, dict] = {}
    for text in args.training_metrics:
        label, path = training_metrics_label(text)
        training[label] = read_optional_json(path, "training metrics") or {}
    metrics = evaluate(args.data, args.model, seen_classes=seen, seen_source=source,
                       image_spec=spec, protocol=protocol)
    metrics = _finite(metrics)
    if privacy is not None:
        metrics["privacy"] = privacy  # unchanged: the same keys as every other artifact
    path = storage.join(args.output, "metrics.json")
    storage.write_bytes_atomic(path, (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
    paths = {"metrics": path}
    paths.update(report.write_reports(args.output, metrics, privacy, stats, training))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = run(args)
    except (EvaluationError, ConfigError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
