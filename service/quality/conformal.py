"""Split-conformal candidate sets and abstention thresholds, from the gold sample.

``conformal_sets`` computes the threshold on the gold sample's scores (weighted by 1/π) so that
the set of labels at or above it holds the gold label with probability 1−α; ``abstention_threshold``
the confidence under which a label is withheld to reach a target accuracy. Conventions as in
``service.quality.metrics``.
"""

from __future__ import annotations

import numpy as np
from crepes import ConformalClassifier
from scipy.stats import norm

from service.quality.metrics import TIE_DECIMALS, check_distribution, check_weights

WILSON_Z = norm.ppf(0.95)  # one-sided 95% lower bound


def conformal_sets(*, probs: np.ndarray, gold_index: np.ndarray, alpha: float, weights: np.ndarray | None = None,
                   seed: int = 0, splits: int = 200) -> dict:
    """Split-conformal threshold for candidate sets that hold the true label with probability ≥ 1 − alpha.

    Score: 1 − p(true label) (LAC). A document whose true label is outside the columns
    (``gold_index`` −1) scores 1, the worst, in calibration and counts as uncovered when held out:
    no candidate set can hold it. Non-uniform ``weights`` (1/π) make the calibration sample stand for
    the population (Tibshirani et al. 2019); the test point gets the largest calibration weight,
    which keeps the threshold valid for any document weighing no more than that.
    """
    probs = np.asarray(probs, dtype=float)
    gold_index = np.asarray(gold_index)
    n = len(probs)
    if probs.ndim != 2 or gold_index.shape != (n,) or np.any((gold_index < -1) | (gold_index >= probs.shape[1])):
        raise ValueError("gold_index: expected one column index (or −1) per row of probs")
    if n < 10:
        raise ValueError(f"conformal sets need at least 10 gold documents, got {n}")
    if not 0 < alpha < 1 or splits < 1:
        raise ValueError(f"alpha must lie in (0, 1) (got {alpha}) and splits be at least 1 (got {splits})")
    weights = np.ones(n) if weights is None else check_weights(weights, n)
    uniform = bool(np.all(weights == weights[0]))
    scores = np.where(gold_index >= 0, 1 - probs[np.arange(n), gold_index], 1.0)
    rng = np.random.default_rng(seed)
    held_out = np.array([_held_out(probs, gold_index, scores, weights, alpha, rng.permutation(n), uniform)
                         for _ in range(splits)])
    # lowered by 10^-TIE_DECIMALS so that `p >= threshold` keeps a label whose score sits exactly at the
    # quantile despite float rounding in 1 − (1 − p) (label models put many labels at a floor like 1e-10)
    threshold = 1 - _conformal_quantile(scores, weights, alpha) - 10.0 ** -TIE_DECIMALS
    return {"alpha": alpha, "threshold": float(max(0.0, threshold)),
            "coverage": float(held_out[0, 0]), "avg_set_size": float(held_out[0, 1]),
            "mean_coverage": float(held_out[:, 0].mean()), "mean_set_size": float(held_out[:, 1].mean()),
            "n_calibration": n // 2, "n_test": n - n // 2}


def apply_threshold(probs: np.ndarray, labels: list[str], threshold: float) -> list[list[str]]:
    """Candidate set of each row, most probable first: every label with probability ≥ threshold."""
    probs = check_distribution(probs, labels, len(probs))
    order = np.argsort(-probs, axis=1, kind="stable")
    return [[labels[k] for k in row if p[k] >= threshold] for row, p in zip(order, probs)]


def _conformal_quantile(scores: np.ndarray, weights: np.ndarray, alpha: float) -> float:
    """Largest score whose weighted conformal p-value reaches alpha (crepes' unsmoothed rule); inf if all do."""
    w_test = weights.max()
    total = weights.sum() + w_test
    if w_test / total >= alpha:
        return np.inf
    values, first = np.unique(np.sort(scores), return_index=True)
    tail = np.cumsum(weights[np.argsort(scores, kind="stable")][::-1])[::-1][first]
    return float(values[(tail + w_test) / total >= alpha].max())


def _held_out(probs: np.ndarray, gold_index: np.ndarray, scores: np.ndarray, weights: np.ndarray,
              alpha: float, order: np.ndarray, uniform: bool) -> tuple[float, float]:
    """Weighted coverage and mean set size on one half, calibrated on the other."""
    cal, test = order[: len(order) // 2], order[len(order) // 2:]
    if uniform:
        sets = ConformalClassifier().fit(scores[cal]).predict_set(1 - probs[test], confidence=1 - alpha,
                                                                   smoothing=False).astype(bool)
    else:
        sets = 1 - probs[test] <= _conformal_quantile(scores[cal], weights[cal], alpha)
    covered = (gold_index[test] >= 0) & sets[np.arange(len(test)), np.maximum(gold_index[test], 0)]
    return np.average(covered, weights=weights[test]), np.average(sets.sum(axis=1), weights=weights[test])


def abstention_threshold(*, confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray,
                         target_accuracy: float) -> dict:
    """Lowest confidence cut-off whose kept documents reach a target accuracy, plainly and with a 95% lower bound."""
    confidence = np.round(np.asarray(confidence, dtype=float), TIE_DECIMALS)
    correct = np.asarray(correct, dtype=float)
    weights = check_weights(weights, len(confidence))
    if correct.shape != confidence.shape or len(confidence) == 0:
        raise ValueError("confidence and correct must be non-empty and of one length")
    if not 0 < target_accuracy < 1:
        raise ValueError(f"target_accuracy must lie in (0, 1), got {target_accuracy}")
    order = np.argsort(-confidence, kind="stable")
    ordered = confidence[order]
    last = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True))  # each cut keeps everything up to here
    cuts = ordered[last]
    mass, hits, squares = (np.cumsum(v[order])[last] for v in (weights, weights * correct, weights**2))
    accuracy, n_eff = hits / mass, mass**2 / squares
    lower = (accuracy + WILSON_Z**2 / (2 * n_eff) - WILSON_Z * np.sqrt(
        accuracy * (1 - accuracy) / n_eff + WILSON_Z**2 / (4 * n_eff**2))) / (1 + WILSON_Z**2 / n_eff)
    result: dict[str, float | None] = {"target_accuracy": target_accuracy}
    for suffix, ok in (("", accuracy >= target_accuracy), ("_conservative", lower >= target_accuracy)):
        i = np.flatnonzero(ok)[-1] if ok.any() else None  # cuts run from high to low
        result["threshold" + suffix] = None if i is None else float(cuts[i])
        result["coverage" + suffix] = None if i is None else float(mass[i] / weights.sum())
        result["accuracy" + suffix] = None if i is None else float(accuracy[i])
    return result
