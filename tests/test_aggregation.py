"""Aggregation of several annotators (crowd-kit label models) and their agreement, on small seeded data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from service.labelling.aggregation import CALIBRATION_MIN_DOCS, VOTE_METHODS, aggregate, agreement
from service.taxonomy import parse_taxonomy

TAXONOMY = parse_taxonomy("""
name: colours
description: Things sorted by colour.
instruction: Pick the colour.
abstention: {ambiguity_margin: 0.01}
labels:
  - {name: red, description: red things}
  - {name: green, description: green things}
  - {name: blue, description: blue things}
""")
OPTIONS = ("red", "green", "blue")


def _row(doc_id, annotator, label=None, *, status="ok", reason=None, distribution=None, error=None):
    """One annotator's row for one document, as the store returns it."""
    if distribution is None and label is not None:
        distribution = {name: 0.8 if name == label else 0.1 for name in OPTIONS}
    return {"doc_id": doc_id, "annotator": annotator, "status": status, "label": label,
            "distribution": distribution or {}, "abstained": reason is not None, "abstain_reason": reason,
            "error": error}


def test_abstentions_are_no_opinion_not_a_class():
    """Two abstentions and one 'blue' vote give 'blue'; a document with no votes abstains with the common reason."""
    rows = [_row("d1", "a", reason="below_threshold"), _row("d1", "b", reason="below_threshold"), _row("d1", "c", "blue"),
            _row("d2", "a", reason="out_of_taxonomy"), _row("d2", "b", reason="out_of_taxonomy"),
            _row("d2", "c", reason="ambiguous")]
    for method in VOTE_METHODS:
        out = aggregate(rows, TAXONOMY, OPTIONS, method=method, weights={"a": None, "b": None, "c": None})
        assert out["d1"].label == "blue" and not out["d1"].abstained, method
        assert out["d2"].abstained and out["d2"].abstain_reason == "out_of_taxonomy", method


def test_every_annotator_failed_means_failed_and_ties_are_ambiguous():
    """A document whose annotators all failed is failed with their errors; a 1–1 majority tie is abstained."""
    rows = [_row("d1", "a", status="failed", error="timeout"), _row("d1", "b", status="failed", error="boom"),
            _row("d2", "a", "red"), _row("d2", "b", "green")]
    out = aggregate(rows, TAXONOMY, OPTIONS, method="majority_vote", weights={"a": None, "b": None})
    assert out["d1"].status == "failed" and out["d1"].error == "boom; timeout"
    assert out["d2"].abstained and out["d2"].abstain_reason == "ambiguous"
    assert out["d2"].distribution == {"red": 0.5, "green": 0.5, "blue": 0.0}


def test_soft_vote_is_the_weighted_mean_of_distributions():
    """With given weights the aggregated distribution is Σ w·p / Σ w over the annotators that voted."""
    p_a = {"red": 0.6, "green": 0.3, "blue": 0.1}
    p_b = {"red": 0.2, "green": 0.7, "blue": 0.1}
    rows = [_row("d1", "a", "red", distribution=p_a), _row("d1", "b", "green", distribution=p_b)]
    out = aggregate(rows, TAXONOMY, OPTIONS, method="weighted_soft_vote", weights={"a": 3.0, "b": 1.0})
    for name in OPTIONS:
        assert out["d1"].distribution[name] == pytest.approx((3 * p_a[name] + p_b[name]) / 4)
    assert out["d1"].label == "red"


def _simulated_votes(seed: int, n: int = 300):
    """Three decent annotators (80% right) and two that mostly say 'red' whatever the truth."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(OPTIONS, size=n)
    rows = []
    for i, true in enumerate(truth):
        for name in ("good1", "good2", "good3"):
            label = true if rng.random() < 0.8 else rng.choice([o for o in OPTIONS if o != true])
            rows.append(_row(f"d{i}", name, label))
        for name in ("lazy1", "lazy2"):
            rows.append(_row(f"d{i}", name, "red" if rng.random() < 0.9 else true))
    return truth, rows


def test_dawid_skene_learns_which_annotators_to_trust():
    """Without gold labels, Dawid–Skene beats majority vote when two annotators are biased towards one label."""
    truth, rows = _simulated_votes(seed=1)
    weights = {name: None for name in ("good1", "good2", "good3", "lazy1", "lazy2")}
    accuracy = {}
    for method in VOTE_METHODS:
        out = aggregate(rows, TAXONOMY, OPTIONS, method=method, weights=weights)
        accuracy[method] = np.mean([out[f"d{i}"].label == true for i, true in enumerate(truth)])
    assert accuracy["dawid_skene"] > accuracy["majority_vote"] + 0.03, accuracy


def test_agreement_matches_sklearn_kappa_and_alpha_is_one_for_identical_annotators():
    """Pairwise kappa is Cohen's kappa over the documents both voted on; identical annotators have alpha 1."""
    truth, rows = _simulated_votes(seed=2, n=100)
    names = {name: name for name in ("good1", "good2", "good3", "lazy1", "lazy2")}
    report = agreement(rows, names)
    left = [r["label"] for r in rows if r["annotator"] == "good1"]
    right = [r["label"] for r in rows if r["annotator"] == "lazy1"]
    pair = next(p for p in report["pairs"] if (p["a"], p["b"]) == ("good1", "lazy1"))
    assert pair["n"] == 100 and pair["kappa"] == pytest.approx(cohen_kappa_score(left, right))
    assert pair["agreement"] == pytest.approx(np.mean([x == y for x, y in zip(left, right)]))
    assert -1 <= report["krippendorff_alpha"] < 1
    twins = [dict(r, annotator=twin) for r in rows if r["annotator"] == "good1" for twin in ("x", "y")]
    assert agreement(twins, {"x": "x", "y": "y"})["krippendorff_alpha"] == pytest.approx(1.0)


def test_calibrated_mean_stops_a_constant_annotator_from_outvoting_an_informative_one():
    """An LLM that says 'red' at 0.92 for every document carries no information: after batch calibration it is
    nearly uniform, so the informative annotator decides; the plain soft vote follows the constant one."""
    truth = [OPTIONS[i % 3] for i in range(60)]
    constant = {"red": 0.92, "green": 0.04, "blue": 0.04}
    rows = [row for i, label in enumerate(truth) for row in (
        _row(f"d{i}", "llm", "red", distribution=constant),
        _row(f"d{i}", "emb", label, distribution={name: 0.6 if name == label else 0.2 for name in OPTIONS}))]
    weights = {"llm": None, "emb": None}
    plain = aggregate(rows, TAXONOMY, OPTIONS, method="weighted_soft_vote", weights={"llm": 1.0, "emb": 1.0})
    calibrated = aggregate(rows, TAXONOMY, OPTIONS, method="calibrated_mean", weights=weights,
                           calibrated=frozenset({"llm"}))
    assert [plain[f"d{i}"].label for i in range(60)] == ["red"] * 60
    assert [calibrated[f"d{i}"].label for i in range(60)] == truth
    few = aggregate(rows[:2 * (CALIBRATION_MIN_DOCS - 1)], TAXONOMY, OPTIONS, method="calibrated_mean",
                    weights=weights, calibrated=frozenset({"llm"}))
    assert all(annotation.label == "red" for annotation in few.values())  # too few documents: left as it is
