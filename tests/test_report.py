"""Markdown and HTML reports: privacy keys, infinite epsilon, self-contained valid HTML, plots."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from dpfedemb import evaluate as ev
from dpfedemb import plots, report

PRIVACY = {
    "epsilon": "inf", "delta": 1e-6, "noise_multiplier": 0.0, "clip_norm": 1.0,
    "sampling": {"kind": "poisson", "rate": 0.05}, "rounds": 100, "users_per_client": 4,
    "neighboring_relation": "add_or_remove_one_virtual_client_replace_special",
    "accountant": "pld", "unit": "user",
    "phases": [{"name": "federated", "epsilon": 3.2, "delta": 5e-7, "rounds": 80},
               {"name": "finetune", "epsilon": float("inf"), "noise_multiplier": 0.0,
                "tree_seed_secret": True}],
    "<b>odd key</b>": "a & b",
}


class Checker(HTMLParser):
    """Collects text, tags and attributes; checks that every opened tag is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Checker:
    c = Checker()
    c.feed(text)
    c.close()
    assert not c.stack, f"unclosed tags {c.stack}"
    return c


@pytest.fixture(scope="module")
def metrics() -> dict:
    """Metrics of raw pixels and a 'trained' embedding on synthetic data, seen and unseen."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 10)
    centres = rng.normal(size=(6, 12))
    embeddings = {"raw_pixels": rng.normal(size=(60, 12)) + 0.5 * centres[labels],
                  "trained": rng.normal(size=(60, 12)) + 2 * centres[labels]}
    protocol = ev.Protocol(bootstrap_resamples=20)
    masks, subsets = ev.subset_masks(labels, [0, 1, 2])
    plans = [ev.plan_subset(n, labels, m, protocol) for n, m in masks.items()]
    models = {name: {"kind": name, "path": None if name == "raw_pixels" else "/m/trained",
                     "embedding_dim": 12, "image": {"height": 28, "width": 28, "channels": 1},
                     "subsets": {p.name: ev.subset_metrics(e[p.index], p, protocol) for p in plans}}
              for name, e in embeddings.items()}
    return {"protocol": ev.protocol_description(protocol), "subsets": subsets,
            "data": {"pattern": "/data/eval-*", "examples": 60, "classes": 6},
            "seen_classes": [0, 1, 2], "seen_classes_source": "--train-classes",
            "model_order": list(models), "models": models}


def test_epsilon_formatting():
    for inf in ("inf", "Infinity", "+inf", float("inf")):
        assert report.format_epsilon(inf) == report.NOT_PRIVATE
    assert report.format_epsilon(2.5) == "2.5" and report.format_epsilon("1.25") == "1.25"
    assert report.format_value("phases[1].target_epsilon", float("inf")) == report.NOT_PRIVATE


def test_html_is_self_contained_names_every_privacy_key(tmp_path, metrics):
    training = {"federated": {"rounds": [{"round": 1, "loss": 2.0, "epsilon": 0.5},
                                         {"round": 2, "epsilon": "inf"}, {"loss": 1.0}]}}
    paths = report.write_reports(str(tmp_path), metrics, PRIVACY, {"users": 40, "dead_letters":
                                                                  {"bad_channels": 2}}, training)
    page = open(paths["html"], encoding="utf-8").read()
    checker = parse(page)
    text = " ".join(checker.text)
    for key in report.all_keys(PRIVACY):
        assert key in text, key
    assert report.NOT_PRIVATE in text
    assert not re.search(r"\binf(inity)?\b", text, re.I)  # infinity is never shown as a number
    tags = [t for t, _ in checker.tags]
    assert "script" not in tags and "b" not in tags  # the odd key is escaped, not markup
    imgs = [a["src"] for t, a in checker.tags if t == "img"]
    assert len(imgs) == 3 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    assert "raw_pixels" in text and "trained" in text and "2 ({\"bad_channels\": 2})" in text
    assert "users per virtual client" in text  # k > 1 explained


def test_markdown_privacy_budget_and_utility(metrics):
    md = report.render_markdown(metrics, PRIVACY, {"users": 40, "virtual_clients": 10,
                                                   "examples": 800, "dead_lettered": 3})
    budget = md.split("### Budget per phase and in total")[1].split("###")[0]
    assert "| phases[0]: federated | 3.2 | 5e-07 |" in budget
    assert f"| phases[1]: finetune | {report.NOT_PRIVATE} |" in budget
    assert f"| total (composed over all phases) | {report.NOT_PRIVATE} | 1e-06 |" in budget
    assert "| virtual clients | 10 |" in md and "| dead-lettered | 3 |" in md
    for name in ("raw_pixels", "trained"):
        for subset in ("all", "seen", "unseen"):
            assert f"| {name} | {subset} |" in md
    assert "Figures: see report.html." in md


def test_no_privacy_file_and_missing_subsets(metrics):
    m = dict(metrics, subsets=dict(metrics["subsets"], unseen={
        "available": False, "note": "no unseen classes: every evaluation class was seen"}))
    md = report.render_markdown(m, None, None)
    assert "No DP training in this evaluation" in md
    assert "unseen classes: no unseen classes" in md
    parse(report.render_html(m, None, None, {}))


def test_finite_epsilon_headline(metrics):
    md = report.render_markdown(metrics, {"epsilon": 7.93, "delta": 1e-5}, None)
    assert "Guarantee: (7.93, 1e-05)-DP at the user level" in md


def test_plots_tolerate_missing_keys():
    assert plots.series([{"loss": 1}, {"round": 5, "loss": "inf"}, "junk", {"round": 7}], "loss") \
        == ([1.0], [1.0])
    assert plots.training_curves({"a": {}, "b": {"rounds": [{"round": 1}]}}) is None
    assert plots.training_curves({"a": {"rounds": [{"round": 1, "epsilon": 1.0}]}}) \
        .startswith("data:image/png;base64,")


def test_cli_reports_json_roundtrip(metrics):
    # metrics.json as the CLI writes it (strict JSON) renders the same.
    again = json.loads(json.dumps(ev._finite(metrics)))
    assert report.render_markdown(again, PRIVACY, None) == report.render_markdown(metrics, PRIVACY, None)
