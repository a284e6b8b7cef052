"""Privacy report / model card: Markdown (report.md) and self-contained HTML (report.html).

One content builder produces a list of blocks (headings, paragraphs, lists, tables, figures);
two renderers turn them into Markdown and HTML, so both reports always say the same thing. The
HTML embeds its figures as PNG data URIs and its CSS inline (no external resources, no scripts),
so it reads the same in the Kubeflow UI and in a browser; every text is escaped.

The privacy section renders a training ``privacy.json`` unchanged: every key it has is named, and
an epsilon of infinity (the string "inf" or a float) reads "∞ (not private)", never a number.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
from typing import Any, Mapping, Optional, Sequence, Union

from dpfedemb import plots, storage

NOT_PRIVATE = "∞ (not private)"
NO_DP = ("No DP training in this evaluation: no privacy.json was given, so this report certifies "
         "no differential-privacy guarantee for any model above.")
PRIVACY_UNIT = ("one user, with all of their examples (user-level DP); each user belongs to exactly "
                "one virtual client")
MECHANISM = ("DP-FedEmb: each round, virtual clients are sampled; each sampled client's backbone "
             "update is clipped to L2 norm C and the server adds Gaussian noise of standard "
             "deviation z*C to their sum. Classification heads stay local and are never aggregated. "
             "The noise is not reproducible from any stored artifact or log.")
STAT_FIELDS = (("users", ("users", "num_users", "distinct_users")),
               ("virtual clients", ("virtual_clients", "num_virtual_clients", "clients")),
               ("examples", ("examples", "num_examples", "examples_kept", "kept_examples")),
               ("dead-lettered", ("dead_lettered", "dead_letters", "num_dead_letters",
                                  "dead_letter_records")))
SUBSET_NAMES = ("all", "seen", "unseen")


@dataclasses.dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass(frozen=True)
class Para:
    text: str


@dataclasses.dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclasses.dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Plot:
    uri: Optional[str]
    alt: str


Block = Union[Heading, Para, Bullets, Table, Plot]


# ------------------------------------------------------------------------------------- formatting

def is_infinite(value: Any) -> bool:
    """True for float infinity and for strings such as "inf", "Infinity", "∞"."""
    if isinstance(value, str):
        return value.strip().lower().lstrip("+") in ("inf", "infinity", "∞")
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isinf(value)


def format_epsilon(value: Any) -> str:
    """An epsilon for people: infinity is "∞ (not private)", numbers get 6 significant digits."""
    if is_infinite(value):
        return NOT_PRIVATE
    if value is None:
        return "not stated"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "undefined" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1].split("[", 1)[0]


def is_epsilon_key(path: str) -> bool:
    """Keys whose values are epsilons (``epsilon``, ``target_epsilon``, ``eps``, ...)."""
    leaf = _leaf(path).lower()
    return "epsilon" in leaf or leaf in ("eps", "ε")


def format_value(path: str, value: Any) -> str:
    """Any JSON value as text; epsilons through :func:`format_epsilon`."""
    if is_epsilon_key(path):
        if isinstance(value, list):
            return ", ".join(format_epsilon(v) for v in value)
        return format_epsilon(value)
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.6g}"
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(format_value("", v) for v in value) or "(none)"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every leaf; lists of objects are indexed (``phases[0].epsilon``)."""
    if isinstance(obj, Mapping) and obj:
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, Mapping) for v in obj):
        return [p for i, v in enumerate(obj) for p in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, obj)]


def all_keys(obj: Any) -> set[str]:
    """Every key of a JSON object, at any depth (what the reports must name)."""
    if isinstance(obj, Mapping):
        return {str(k) for k in obj} | {k for v in obj.values() for k in all_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in all_keys(v)}
    return set()


def with_ci(value: Optional[float], ci: Optional[Sequence[float]], mark: str = "") -> str:
    """``0.873 [0.851, 0.890]``; "—" when undefined."""
    if value is None:
        return "—"
    text = f"{value:.3f}{mark}"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


# ---------------------------------------------------------------------------------------- content

def _phases(privacy: Mapping) -> list[Mapping]:
    phases = privacy.get("phases")
    return [p for p in phases if isinstance(p, Mapping)] if isinstance(phases, list) else []


def _phase_name(phase: Mapping, i: int) -> str:
    for key in ("name", "phase", "step"):
        if isinstance(phase.get(key), str):
            return phase[key]
    return f"phase {i + 1}"


def budget_table(privacy: Mapping) -> Table:
    """Epsilon and delta per phase and in total."""
    rows = [[f"phases[{i}]: {_phase_name(p, i)}", format_epsilon(p.get("epsilon")),
             format_value("delta", p.get("delta"))] for i, p in enumerate(_phases(privacy))]
    rows.append(["total (composed over all phases)", format_epsilon(privacy.get("epsilon")),
                 format_value("delta", privacy.get("delta"))])
    return Table(["phase", "epsilon", "delta"], rows)


def privacy_blocks(privacy: Optional[Mapping]) -> list[Block]:
    """Privacy unit, mechanism, budget and every key of privacy.json."""
    blocks: list[Block] = [Heading("Privacy")]
    if privacy is None:
        return blocks + [Para(NO_DP)]
    eps = privacy.get("epsilon")
    headline = (f"Guarantee: ({format_epsilon(eps)}, {format_value('delta', privacy.get('delta'))})"
                "-DP at the user level" if not is_infinite(eps) else
                f"Guarantee: epsilon = {NOT_PRIVATE}: no meaningful DP guarantee")
    relation = privacy.get("neighboring_relation", privacy.get("neighbouring_relation"))
    facts = [headline, f"Privacy unit: {PRIVACY_UNIT}.",
             f"Mechanism: {privacy['mechanism'] if 'mechanism' in privacy else MECHANISM}",
             f"Accountant: {format_value('accountant', privacy.get('accountant', 'not stated'))}",
             "Neighbouring relation: " + format_value("neighboring_relation",
                                                       relation or "not stated")]
    k = privacy.get("users_per_client")
    if isinstance(k, int) and k > 1:
        facts.append(f"With {k} users per virtual client, removing one user changes (not removes) "
                     "its client's clipped update; the neighbouring relation above covers that.")
    blocks += [Bullets(facts), Heading("Budget per phase and in total", 3), budget_table(privacy),
               Heading("Every DP parameter (privacy.json, unchanged)", 3)]
    top = {k: v for k, v in privacy.items() if k != "phases"}
    blocks.append(Table(["key", "value"], [[p, format_value(p, v)] for p, v in flatten(top)]))
    for i, phase in enumerate(_phases(privacy)):
        blocks += [Heading(f"phases[{i}]: {_phase_name(phase, i)}", 4),
                   Table(["key", "value"], [[p, format_value(p, v)] for p, v in flatten(phase)])]
    if "phases" in privacy and not _phases(privacy):
        blocks.append(Para(f"phases: {format_value('phases', privacy['phases'])}"))
    return blocks


def _stat(stats: Mapping, names: Sequence[str]) -> str:
    """The first of ``names`` in ``stats``; a mapping (e.g. by reason) shows its sum first."""
    for name in names:
        if name in stats:
            v = stats[name]
            if isinstance(v, Mapping):
                nums = [x for x in v.values()
                        if isinstance(x, (int, float)) and not isinstance(x, bool)]
                return f"{sum(nums):g} ({format_value(name, v)})" if nums else format_value(name, v)
            return format_value(name, v)
    return "not reported"


def data_blocks(metrics: Mapping, stats: Optional[Mapping]) -> list[Block]:
    """Partition statistics (all keys) and the evaluation data."""
    blocks: list[Block] = [Heading("Data statistics")]
    if stats is None:
        blocks.append(Para("No partition statistics were given (--partition-stats)."))
    else:
        blocks += [Table(["training population", "value"],
                         [[label, _stat(stats, names)] for label, names in STAT_FIELDS]),
                   Heading("All partition statistics (stats.json)", 3),
                   Table(["key", "value"], [[p, format_value(p, v)] for p, v in flatten(stats)])]
    data = metrics.get("data", {})
    seen = metrics.get("seen_classes")
    seen_text = "unknown" if seen is None else \
        f"{format_value('', seen)} (from {metrics.get('seen_classes_source')})"
    notes = [f"{name} classes: {info['note']}" for name, info in metrics.get("subsets", {}).items()
             if not info.get("available", True)]
    blocks.append(Bullets([f"Evaluation data: {data.get('examples', '?')} images, "
                           f"{data.get('classes', '?')} classes ({data.get('pattern', '')}).",
                           f"Classes seen in training: {seen_text}"] + notes))
    return blocks


def utility_table(metrics: Mapping) -> Table:
    """One row per model and available subset: recall@1 and TAR@FAR with 95% intervals."""
    fars = metrics.get("protocol", {}).get("fars", [])
    rows = []
    for name in metrics.get("model_order") or list(metrics.get("models", {})):
        for subset, r in metrics["models"][name].get("subsets", {}).items():
            tars = [r.get("tar_at_far", {}).get(f, {}) for f in fars]
            rows.append([name, subset, str(r["examples"]), str(r["classes"]),
                         f"{r['queries']} ({r['excluded_queries']})",
                         with_ci(r.get("recall_at_1"), r.get("recall_at_1_ci"))]
                        + [with_ci(t.get("tar"), t.get("ci"), "" if t.get("resolved") else "†")
                           for t in tars]
                        + [f"{r['genuine_pairs']} / {r['impostor_pairs_used']}"
                           + (f" of {r['impostor_pairs_total']}" if r.get("impostor_pairs_sampled")
                              else "")])
    headers = ["model", "classes subset", "images", "classes", "queries (excluded)",
               "recall@1 [95% CI]"] + [f"TAR@FAR={f} [95% CI]" for f in fars] + \
        ["genuine / impostor pairs"]
    return Table(headers, rows)


def utility_blocks(metrics: Mapping) -> list[Block]:
    proto = metrics.get("protocol", {})
    boot = proto.get("bootstrap", {})
    return [Heading("Utility"), utility_table(metrics), Bullets([
        f"Similarity: {proto.get('similarity', 'cosine')}; {proto.get('subsets', '')}.",
        f"recall@1 ties: {proto.get('recall_ties', '')}; single-image classes: "
        f"{proto.get('single_image_classes', '')}.",
        f"TAR threshold: {proto.get('threshold', '')}. Impostor pairs: "
        f"{proto.get('impostor_sampling', '')} (cap {proto.get('max_impostor_pairs', '?')}).",
        f"Intervals: {boot.get('confidence', 0.95):.0%} percentile bootstrap over classes, "
        f"{boot.get('resamples', '?')} resamples, seed {boot.get('seed', '?')}; TAR: "
        f"{boot.get('tar', '')}.",
        "† fewer than 1/FAR impostor pairs: the FAR is not resolved and TAR is optimistic.",
        "raw_pixels: cosine similarity of the raw pixels, the floor every embedding should beat."]
        + [f"{name} classes: {info['note']}" for name, info in metrics.get("subsets", {}).items()
           if not info.get("available", True)])]


def model_blocks(metrics: Mapping) -> list[Block]:
    rows = []
    for name in metrics.get("model_order") or list(metrics.get("models", {})):
        m = metrics["models"][name]
        img = m.get("image", {})
        rows.append([name, m.get("path") or "(raw pixels)", str(m.get("embedding_dim", "?")),
                     f"{img.get('height')}x{img.get('width')}x{img.get('channels')}"])
    return [Heading("Models"), Table(["model", "path", "embedding dim", "input"], rows)]


def figure_blocks(metrics: Mapping, training: Mapping[str, Mapping]) -> list[Block]:
    return [Heading("Figures"),
            Plot(plots.training_curves(training), "training loss and epsilon against rounds "
                   "(no training metrics given)" if not training else
                   "training loss and epsilon against rounds"),
            Plot(plots.recall_chart(metrics), "recall@1 with 95% intervals per model"),
            Plot(plots.similarity_histograms(metrics),
                   "genuine vs impostor cosine similarities per model (all classes)")]


def build_blocks(metrics: Mapping, privacy: Optional[Mapping], stats: Optional[Mapping],
                 training: Optional[Mapping[str, Mapping]] = None, figures: bool = False
                 ) -> list[Block]:
    """The report's content, shared by both renderers."""
    blocks: list[Block] = [Heading("Model card and privacy report", 1)]
    blocks += model_blocks(metrics) + privacy_blocks(privacy) + data_blocks(metrics, stats)
    blocks += utility_blocks(metrics)
    if figures:
        blocks += figure_blocks(metrics, training or {})
    return blocks


# -------------------------------------------------------------------------------------- rendering

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown_blocks(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.headers) + " |",
                     "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;
color:#1a1a1a;max-width:1200px}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}h1{font-size:1.6em}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}figure{margin:1em 0}
img{max-width:100%}figcaption{font-size:.85em;color:#555}.wrap{overflow-x:auto}"""


def _html_block(b: Block) -> str:
    e = html.escape
    if isinstance(b, Heading):
        return f"<h{b.level}>{e(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p>{e(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                       for row in b.rows)
        return (f'<div class="wrap"><table><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table></div>")
    if b.uri is None:
        return f"<p><em>{e(b.alt)}: no data to plot.</em></p>"
    return (f'<figure><img src="{e(b.uri)}" alt="{e(b.alt)}">'
            f"<figcaption>{e(b.alt)}</figcaption></figure>")


def render_html_blocks(blocks: Sequence[Block], title: str = "dpfedemb model card") -> str:
    body = "\n".join(_html_block(b) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")


def render_markdown(metrics: Mapping, privacy: Optional[Mapping], stats: Optional[Mapping]) -> str:
    """report.md: the model card and privacy report (figures are in report.html)."""
    return render_markdown_blocks(build_blocks(metrics, privacy, stats)
                                  + [Para("Figures: see report.html.")])


def render_html(metrics: Mapping, privacy: Optional[Mapping], stats: Optional[Mapping],
                training: Optional[Mapping[str, Mapping]] = None) -> str:
    """report.html: the same content with embedded figures."""
    return render_html_blocks(build_blocks(metrics, privacy, stats, training, figures=True))


def write_reports(output_dir: str, metrics: Mapping, privacy: Optional[Mapping],
                  stats: Optional[Mapping], training_metrics: Optional[Mapping[str, Mapping]]
                  ) -> dict[str, str]:
    """Write report.md and report.html atomically into ``output_dir``; return their paths."""
    paths = {"markdown": storage.join(output_dir, "report.md"),
             "html": storage.join(output_dir, "report.html")}
    storage.write_bytes_atomic(paths["markdown"],
                               render_markdown(metrics, privacy, stats).encode("utf-8"))
    storage.write_bytes_atomic(paths["html"], render_html(metrics, privacy, stats,
                                                          training_metrics).encode("utf-8"))
    return paths
