"""Students: soft and candidate-set targets, the option search, every kind's save/load round trip.

Synthetic "LLM labels" with a known truth show what each training target teaches; the
student kinds are real (scikit-learn, model2vec, MiniLM, a fine-tuned MiniLM).
"""

from __future__ import annotations

import numpy as np
import pytest

from service.distill.students import load_student
from service.distill.training import TrainingData, distill
from service.labelling.labeller import in_order
from service.settings import Settings

CLASSES = ["alpha", "beta", "gamma"]
MODELS_DIR = Settings().models_dir


def _partial_labels(n: int = 600, seed: int = 0) -> tuple[TrainingData, list[str]]:
    """Texts naming their class; the LLM's candidate set is {truth, a random distractor}, and its distribution
    puts 0.30 on the truth, 0.35 on the distractor and 0.35 on the third class (outside the set)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(CLASSES, size=n)
    texts, probs, candidates = [], [], []
    for label in truth:
        others = [c for c in CLASSES if c != label]
        distractor = others[rng.integers(2)]
        texts.append(f"this is about {label} and {rng.choice(['today', 'again', 'here', 'now'])}")
        probs.append([0.30 if c == label else 0.35 for c in CLASSES])
        candidates.append([c in (label, distractor) for c in CLASSES])
    data = TrainingData(texts=texts, probs=np.array(probs), candidates=np.array(candidates),
                        abstained=np.zeros(n, bool), classes=CLASSES, gold=[None] * n, pi=np.full(n, np.nan))
    return data, list(truth)


def _accuracy(student, texts: list[str], truth: list[str]) -> float:
    """Share of texts whose top class is the truth."""
    probs = in_order(student.predict_proba(texts), list(student.classes_), CLASSES)
    return float(np.mean([CLASSES[int(p.argmax())] == t for p, t in zip(probs, truth)]))


@pytest.mark.parametrize("targets, learns", [("hard", False), ("soft", False), ("candidates", True)])
def test_a_candidate_set_teaches_one_of_these(tmp_path, targets, learns):
    """The truth is in every set but never the LLM's top label: only candidate-set training recovers it.

    Hard targets learn the LLM's (wrong) argmax, soft targets the distribution that favours
    the wrong labels; "A or B" targets refined by the student's own probabilities find the
    one label every set of a word shares.
    """
    data, truth = _partial_labels()
    report = distill(data, kind="ngram", out_dir=tmp_path / "s", models_dir=MODELS_DIR, meta={},
                     targets=targets, weighting="none")
    accuracy = _accuracy(load_student(tmp_path / "s"), data.texts, truth)
    assert report["options"]["targets"] == targets
    assert (accuracy > 0.95) if learns else (accuracy < 0.6), (targets, accuracy)


def test_option_search_reports_every_option_and_keeps_gold_out_of_training(tmp_path):
    """Unset options are tried on validation; gold-sample documents are only ever a test."""
    data, truth = _partial_labels(n=300, seed=1)
    data.gold = [t if i < 50 else None for i, t in enumerate(truth)]
    data.pi = np.where(np.arange(300) < 50, 50 / 300, np.nan)
    report = distill(data, kind="ngram", out_dir=tmp_path / "s", models_dir=MODELS_DIR, meta={"name": "x"})
    tried = {(t["targets"], t["weighting"]) for t in report["options"]["tried"]}
    assert tried == {(t, w) for t in ("hard", "soft", "candidates") for w in ("none", "confidence")}
    best = max(report["options"]["tried"], key=lambda t: t["validation_agreement"])
    assert best["validation_agreement"] == max(t["validation_agreement"] for t in report["options"]["tried"])
    assert report["n_gold"] == 50 and report["gold"]["n"] == 50
    assert report["n_train"] + report["n_validation"] + report["n_test"] == 250
    assert report["cost"]["docs_per_s"] > 0 and report["size_bytes"] > 0


@pytest.mark.parametrize("kind", ["static", "minilm", "finetune"])
def test_every_kind_saves_and_loads_with_the_same_predictions(tmp_path, kind):
    """A trained student reloaded from its directory predicts exactly what it reported on."""
    data, truth = _partial_labels(n=120, seed=2)
    report = distill(data, kind=kind, out_dir=tmp_path / "s", models_dir=MODELS_DIR, meta={"name": kind},
                     targets="soft", weighting="none", epochs=1)
    student = load_student(tmp_path / "s")
    probs = student.predict_proba(data.texts[:5])
    assert probs.shape == (5, len(student.classes_)) and np.allclose(probs.sum(axis=1), 1, atol=1e-3)
    assert report["kind"] == kind and report["llm_holdout"]["n"] == report["n_test"]
    again = load_student(tmp_path / "s").predict_proba(data.texts[:5])
    assert np.allclose(probs, again, atol=1e-6)
