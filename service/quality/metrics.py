"""Design-weighted quality metrics of labels against gold: accuracy, per-label F1, confusion, calibration.

Pure functions over numpy arrays (no I/O, no service imports). Shared conventions: ``probs`` is
an (n, K) distribution matrix whose columns follow ``labels`` (rows sum to 1, or to 0 for a blank
document); ``predicted`` holds the chosen label or None where the annotator abstained; ``weights``
are sampling weights 1/π; a row's confidence is its largest probability and its top label the
argmax (a blank row has confidence 0 and no top label). Intervals are normal-approximation dicts
``{"estimate", "se", "low", "high"}`` of plain floats (``se``/``low``/``high`` None from one
document).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

TIE_DECIMALS = 9  # confidences equal to this many decimals are one tie; thresholds sit this far below the cut
ABSTAINED = "(abstained)"


NO_REASON = "(no reason)"


def quality_report(*, gold: list[str], predicted: list[str | None], probs: np.ndarray, labels: list[str],
                   weights: np.ndarray, abstain_reasons: list[str | None], bins: int = 10,
                   coverages: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                   level: float = 0.95) -> dict:
    """Design-weighted (Hájek) accuracy, calibration and confusion of an annotator on a gold sample."""
    probs, weights = check_distribution(probs, labels, len(gold)), check_weights(weights, len(gold))
    if len(gold) == 0 or len(predicted) != len(gold) or len(abstain_reasons) != len(gold):
        raise ValueError(f"gold, predicted and abstain_reasons must be non-empty and of one length; got "
                         f"{len(gold)}, {len(predicted)}, {len(abstain_reasons)}")
    unknown = sorted({p for p in predicted if p is not None} - set(labels))
    if unknown:
        raise ValueError(f"predicted: labels {unknown} are not among labels {labels}")
    if bins < 1 or not all(0 < c <= 1 for c in coverages):
        raise ValueError("bins must be at least 1 and every coverage in (0, 1]")
    gold_arr = np.array(gold, dtype=object)
    answered = np.array([p is not None for p in predicted])
    chosen = np.array([ABSTAINED if p is None else p for p in predicted], dtype=object)
    gold_column = np.array([labels.index(g) if g in labels else -1 for g in gold])
    confidence = np.round(probs.max(axis=1), TIE_DECIMALS)  # float noise must not split real ties
    correct_top = (top_index(probs) == gold_column) & (gold_column >= 0)
    total = weights.sum()
    return {
        "n": len(gold), "weighted_n": float(total),
        "accuracy": hajek((chosen == gold_arr)[answered], weights[answered], level),
        "top_label_accuracy": hajek(correct_top, weights, level),
        "coverage": float(weights[answered].sum() / total),
        "abstention_rate": float(weights[~answered].sum() / total),
        "abstentions": _abstentions(gold_arr, answered, abstain_reasons, weights),
        "per_label": _per_label(gold_arr[answered], chosen[answered], weights[answered], labels),
        "confusion": _confusion(gold_arr, chosen, weights),
        **calibration(confidence, correct_top, weights, bins),
        "selective": [_selective(confidence, correct_top, weights, c) for c in coverages],
        "kappa": _kappa(gold_arr[answered], chosen[answered], weights[answered]),
    }


def check_distribution(probs: np.ndarray, labels: list[str], n: int) -> np.ndarray:
    """The distribution matrix as floats, once its shape matches the documents and labels."""
    probs = np.asarray(probs, dtype=float)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels: expected distinct label names, got {labels}")
    if probs.shape != (n, len(labels)):
        raise ValueError(f"probs: expected shape ({n}, {len(labels)}) (documents × labels), got {probs.shape}")
    return probs


def check_weights(weights: np.ndarray, n: int) -> np.ndarray:
    """Sampling weights as floats, once they are n positive finite numbers."""
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (n,) or not np.all(np.isfinite(weights) & (weights > 0)):
        raise ValueError(f"weights: expected {n} positive finite sampling weights (1/π), got shape {weights.shape}")
    return weights


def interval(estimate: float, se: float | None, level: float) -> dict:
    """A normal-approximation interval as plain floats."""
    z = norm.ppf(0.5 + level / 2)
    low, high = (None, None) if se is None else (float(estimate - z * se), float(estimate + z * se))
    return {"estimate": float(estimate), "se": None if se is None else float(se), "low": low, "high": high}


def clipped(interval: dict | None) -> dict | None:
    """A share's interval cut to [0, 1]."""
    if interval is None or interval["low"] is None:
        return interval
    return {**interval, "low": max(0.0, interval["low"]), "high": min(1.0, interval["high"])}


def hajek(y: np.ndarray, w: np.ndarray, level: float) -> dict | None:
    """Weighted mean with its linearised ratio-estimator SE; None over no documents."""
    if len(y) == 0:
        return None
    y = y.astype(float)
    mean = (w * y).sum() / w.sum()
    n = len(y)
    se = np.sqrt(n / (n - 1) * np.sum((w * (y - mean)) ** 2)) / w.sum() if n > 1 else None
    return interval(mean, se, level)


def _share(numerator: float, denominator: float) -> float | None:
    """A ratio, None when nothing is in the denominator."""
    return float(numerator / denominator) if denominator > 0 else None


def _abstentions(gold: np.ndarray, answered: np.ndarray, reasons: list[str | None], w: np.ndarray) -> list[dict]:
    """What the abstained documents really were, per abstain reason, most frequent first."""
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(~answered):
        groups.setdefault(reasons[i] or NO_REASON, []).append(int(i))
    rows = [{"reason": reason, "n": len(idx), "weighted_share": float(w[idx].sum() / w.sum()),
             "gold_labels": {str(g): int(c) for g, c in zip(*np.unique(gold[idx].astype(str), return_counts=True))}}
            for reason, idx in groups.items()]
    return sorted(rows, key=lambda r: -r["weighted_share"])


def _per_label(gold: np.ndarray, chosen: np.ndarray, w: np.ndarray, labels: list[str]) -> list[dict]:
    """Weighted precision, recall and F1 of each label (gold labels outside ``labels`` too)."""
    rows = []
    for label in labels + sorted(set(gold) - set(labels)):
        hit, said, true = w[(gold == label) & (chosen == label)].sum(), chosen == label, gold == label
        rows.append({"label": label, "precision": _share(hit, w[said].sum()), "recall": _share(hit, w[true].sum()),
                     "f1": _share(2 * hit, w[said].sum() + w[true].sum()),
                     "support": int(true.sum()), "weighted_support": float(w[true].sum())})
    return rows


def _confusion(gold: np.ndarray, chosen: np.ndarray, w: np.ndarray) -> list[dict]:
    """Non-empty cells of the gold × chosen table, raw and weighted."""
    cells: dict[tuple[str, str], tuple[int, float]] = {}
    for g, c, wi in zip(gold, chosen, w):
        n, wn = cells.get((g, c), (0, 0.0))
        cells[(g, c)] = (n + 1, wn + wi)
    return [{"gold": g, "predicted": c, "n": n, "weighted_n": float(wn)} for (g, c), (n, wn) in sorted(cells.items())]


def calibration(confidence: np.ndarray, correct: np.ndarray, w: np.ndarray, bins: int) -> dict:
    """Weighted expected calibration error over equal-width confidence bins, and the bins themselves."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece, reliability = 0.0, []
    for b in np.unique(which):
        inside = which == b
        conf = np.average(confidence[inside], weights=w[inside])
        acc = np.average(correct[inside], weights=w[inside])
        ece += w[inside].sum() / w.sum() * abs(acc - conf)
        reliability.append({"bin": int(b), "lower": b / bins, "upper": (b + 1) / bins, "n": int(inside.sum()),
                            "confidence": float(conf), "accuracy": float(acc)})
    return {"ece": float(ece), "reliability": reliability}


def _selective(confidence: np.ndarray, correct: np.ndarray, w: np.ndarray, target: float) -> dict:
    """Top-label accuracy of the most confident documents reaching a weighted coverage (ties kept together)."""
    order = np.argsort(-confidence, kind="stable")
    reached = np.cumsum(w[order]) / w.sum()
    threshold = confidence[order][min(int(np.searchsorted(reached, target - 1e-12)), len(w) - 1)]
    kept = confidence >= threshold
    return {"coverage": float(w[kept].sum() / w.sum()), "threshold": float(threshold),
            "accuracy": float(np.average(correct[kept], weights=w[kept])), "n": int(kept.sum())}


def _kappa(gold: np.ndarray, chosen: np.ndarray, w: np.ndarray) -> float | None:
    """Weighted Cohen's kappa; None when chance agreement is already perfect or nothing was answered."""
    if len(gold) == 0:
        return None
    classes, codes = np.unique(np.concatenate([gold, chosen]).astype(str), return_inverse=True)
    table = np.zeros((len(classes), len(classes)))
    np.add.at(table, (codes[: len(gold)], codes[len(gold):]), w)
    table /= table.sum()
    observed, chance = np.trace(table), table.sum(axis=1) @ table.sum(axis=0)
    return None if chance >= 1 else float((observed - chance) / (1 - chance))


def top_index(probs: np.ndarray) -> np.ndarray:
    """Column of each row's top label, −1 for a blank row."""
    return np.where(probs.sum(axis=1) > 0, probs.argmax(axis=1), -1)
