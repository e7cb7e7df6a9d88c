"""Distillation: train a student on a job's LLM labels, pick the training option that works, measure it.

``distill`` is a pure function of the training data (no store): the ingress gathers the
data and runs it as a Ray task, the CLI and the benchmark call it directly.

1. Split. Gold-sample documents never train a student: they are its honest test. The
   other labelled documents are shuffled; ``holdout`` of them test agreement with the
   LLM, 10% of the rest choose the training option, the remainder train.
2. Options. ``targets``: ``hard`` (the LLM's label), ``soft`` (its distribution) or
   ``candidates`` (its candidate set, learnt as "one of these"); ``weighting``: ``none``
   or ``confidence`` (each document weighted by the LLM's confidence); abstained
   documents are left out (``abstained='exclude'``) or taught as "none of these"
   (``'none'``). Unset options are chosen by agreement with the LLM on the validation
   split (linear kinds try every combination; the fine-tuned encoder trains once, on
   soft targets unless told otherwise), and the report lists what each option scored.
3. Metrics. On held-out LLM labels: agreement (accuracy against the LLM's label),
   macro-F1 and expected calibration error; on the gold sample, when there is one:
   accuracy, macro-F1 and ECE against the people, weighted by 1/π; cost: docs/s over the
   test texts, p50 latency of one-document calls, size on disk and peak resident memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from service.distill.students import KINDS, FineTunedEncoder, Predictor, Targets, features, fit_linear, save_student
from service.labelling.labeller import in_order
from service.quality.metrics import calibration
from service.taxonomy import NONE_LABEL
from service.vocabulary import DistillTarget, Weighting, values

TARGETS = values(DistillTarget)
WEIGHTINGS = values(Weighting)
VALIDATION = 0.1
LATENCY_CALLS = 30


@dataclass
class TrainingData:
    """A job's labelled documents as the student sees them; gold fields are None/NaN outside the sample."""

    texts: list[str]
    probs: np.ndarray  # (n, K) the LLM's distribution over ``classes``
    candidates: np.ndarray  # (n, K) bool
    abstained: np.ndarray  # (n,) bool
    classes: list[str]
    gold: list[str | None] = field(default_factory=list)
    pi: np.ndarray | None = None


def distill(data: TrainingData, *, kind: str, out_dir: Path, models_dir: Path, meta: dict,
            targets: str | None = None, weighting: str | None = None, abstained: str = "exclude",
            holdout: float = 0.2, epochs: int = 2, seed: int = 0) -> dict:
    """Train, choose options, evaluate and save one student; returns its report."""
    if kind not in KINDS:
        raise ValueError(f"unknown student kind {kind!r}; choose one of {', '.join(KINDS)}")
    classes = data.classes + ([NONE_LABEL] if abstained == "none" and NONE_LABEL not in data.classes else [])
    train, validation, test, gold = _split(data, holdout, seed)
    if abstained == "exclude":
        train, validation = train[~data.abstained[train]], validation[~data.abstained[validation]]
    if len(train) < 2 * len(classes):
        raise ValueError(f"only {len(train)} labelled documents to train on; distil a job with more documents")
    texts = np.array(data.texts, dtype=object)
    tried: list[dict] = []
    student: Predictor | None = None
    if kind == "finetune":
        chosen = (targets or "soft", weighting or "none")
        student = FineTunedEncoder(classes, epochs=epochs, seed=seed).fit(
            list(texts[train]), _targets(data, train, classes, *chosen))
    else:
        step = features(kind, models_dir)
        x_train, x_valid = step.transform(list(texts[train])), step.transform(list(texts[validation]))
        best = -1.0
        for option in [(t, w) for t in TARGETS for w in WEIGHTINGS
                       if (targets in (None, t)) and (weighting in (None, w))]:
            fitted = fit_linear(kind, [], _targets(data, train, classes, *option), models_dir=models_dir,
                                refine=option[0] == "candidates", x=x_train)
            head = fitted.named_steps["head"]
            score = _agreement(in_order(head.predict_proba(x_valid), list(head.classes_), classes), classes, data,
                               validation)
            tried.append({"targets": option[0], "weighting": option[1], "validation_agreement": score})
            if score > best:
                best, chosen, student = score, option, fitted
    if student is None:  # a linear kind with no option left by ``targets`` and ``weighting``
        raise ValueError(f"no training option matches targets={targets!r} and weighting={weighting!r}")
    report: dict[str, Any] = {
        "kind": kind, "classes": classes, "abstained": abstained, "epochs": epochs if kind == "finetune" else None,
        "options": {"targets": chosen[0], "weighting": chosen[1], "tried": tried},
        "n_train": int(len(train)), "n_validation": int(len(validation)), "n_test": int(len(test)),
        "n_gold": int(len(gold))}
    def predict(rows: np.ndarray) -> np.ndarray:
        return in_order(student.predict_proba(list(texts[rows])), list(student.classes_), classes)

    started = time.perf_counter()
    test_probs = predict(test) if len(test) else np.zeros((0, len(classes)))
    seconds = time.perf_counter() - started
    report["llm_holdout"] = _against(test_probs, classes, [_top(data, i) for i in test], None)
    if len(gold) and data.pi is None:
        raise ValueError("gold labels need their inclusion probabilities (TrainingData.pi) to be weighted")
    report["gold"] = (_against(predict(gold), classes, [data.gold[i] for i in gold], 1 / data.pi[gold])
                      if len(gold) and data.pi is not None else None)
    report["cost"] = {"docs_per_s": len(test) / seconds if seconds > 0 and len(test) else None,
                      "p50_latency_ms": _latency(student, list(texts[test][:LATENCY_CALLS])),
                      "peak_rss_mb": _peak_rss_mb()}
    report["size_bytes"] = save_student(student, out_dir, {**meta, **{k: report[k] for k in ("kind", "classes")}})
    return report


def _split(data: TrainingData, holdout: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train, validation, test, gold) document indices."""
    n = len(data.texts)
    gold = np.array([i for i in range(n) if data.gold and data.gold[i] is not None], dtype=int)
    rest = np.setdiff1d(np.arange(n), gold)
    rest = np.random.default_rng(seed).permutation(rest)
    n_test = int(round(holdout * len(rest)))
    test, remaining = rest[:n_test], rest[n_test:]
    n_valid = max(1, int(round(VALIDATION * len(remaining))))
    return remaining[n_valid:], remaining[:n_valid], np.sort(test), gold


def _targets(data: TrainingData, rows: np.ndarray, classes: list[str], targets: str, weighting: str) -> Targets:
    """Soft targets over ``classes`` for some documents under one option."""
    k = len(data.classes)
    probs = np.zeros((len(rows), len(classes)))
    probs[:, :k] = data.probs[rows]
    allowed = np.zeros_like(probs, dtype=bool)
    allowed[:, :k] = data.candidates[rows]
    abstained = data.abstained[rows]
    if NONE_LABEL in classes:  # abstentions taught as "none of these"
        none = classes.index(NONE_LABEL)
        probs[abstained], allowed[abstained] = 0.0, False
        probs[abstained, none], allowed[abstained, none] = 1.0, True
    allowed[~allowed.any(axis=1)] = True
    if targets == "hard":
        matrix = np.eye(len(classes))[probs.argmax(axis=1)]
    elif targets == "candidates":
        kept = np.where(allowed, probs, 0.0)
        total = kept.sum(axis=1, keepdims=True)
        matrix = np.where(total > 0, kept / np.where(total > 0, total, 1), allowed / allowed.sum(axis=1, keepdims=True))
    else:
        total = probs.sum(axis=1, keepdims=True)
        matrix = np.where(total > 0, probs / np.where(total > 0, total, 1), 1 / len(classes))
    weights = probs.max(axis=1) if weighting == "confidence" else np.ones(len(rows))
    return Targets(classes, matrix, allowed, np.maximum(weights, 1e-3))


def _top(data: TrainingData, i: int) -> str | None:
    """The LLM's label of a document (None when it abstained)."""
    return None if data.abstained[i] else data.classes[int(data.probs[i].argmax())]


def _agreement(probs: np.ndarray, classes: list[str], data: TrainingData, rows: np.ndarray) -> float:
    """Share of documents where the student's top class is the LLM's label."""
    if not len(rows):
        return 0.0
    return float(np.mean([classes[int(p.argmax())] == _top(data, i) for p, i in zip(probs, rows)]))


def _against(probs: np.ndarray, classes: list[str], truth: list[str | None], weights: np.ndarray | None) -> dict:
    """Accuracy, macro-F1 and ECE of the student's top class against reference labels (None counts as wrong)."""
    if not len(truth):
        return {"n": 0, "accuracy": None, "macro_f1": None, "ece": None}
    weights = np.ones(len(truth)) if weights is None else np.asarray(weights, dtype=float)
    predicted = [classes[int(p.argmax())] for p in probs]
    right = np.array([p == t for p, t in zip(predicted, truth)], dtype=float)
    reference = ["(none)" if t is None else t for t in truth]
    return {"n": len(truth), "accuracy": float(np.average(right, weights=weights)),
            "macro_f1": float(f1_score(reference, predicted, labels=sorted(set(reference)), average="macro",
                                       sample_weight=weights, zero_division=0)),
            "ece": calibration(probs.max(axis=1), right, weights, bins=10)["ece"]}


def _latency(student, texts: list[str]) -> float | None:
    """Median milliseconds of one-document calls."""
    timings = []
    for text in texts:
        started = time.perf_counter()
        student.predict_proba([text])
        timings.append(1000 * (time.perf_counter() - started))
    return float(np.median(timings)) if timings else None


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory (training included; Ray runs each training in its own worker)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
