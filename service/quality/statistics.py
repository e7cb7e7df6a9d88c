"""Sampling designs, design-weighted quality metrics, conformal candidate sets and DSL estimates.

Pure functions over numpy arrays (no I/O, no service imports). Shared conventions: ``probs`` is
an (n, K) distribution matrix whose columns follow ``labels`` (rows sum to 1, or to 0 for a blank
document); ``predicted`` holds the chosen label or None where the annotator abstained; ``weights``
are sampling weights 1/π; a row's confidence is its largest probability and its top label the
argmax (a blank row has confidence 0 and no top label). Intervals are normal-approximation dicts
``{"estimate", "se", "low", "high"}`` of plain floats (``se``/``low``/``high`` None from one
document). DSL is design-based supervised learning (Egami et al. 2023).
"""

from __future__ import annotations

import numpy as np
from crepes import ConformalClassifier
from scipy.special import expit
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression

DESIGNS = ("random", "stratified", "uncertainty")
ABSTAINED = "(abstained)"
NO_REASON = "(no reason)"
MODELS = ("linear", "logistic")
WILSON_Z = norm.ppf(0.95)  # one-sided 95% lower bound
TIE_DECIMALS = 9  # confidences equal to this many decimals are one tie; thresholds sit this far below the cut


def draw_sample(*, predicted: list[str | None], confidence: np.ndarray, size: int, design: str,
                seed: int = 0, floor: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the population of len(predicted)) of the documents drawn, and their inclusion probabilities."""
    population = len(predicted)
    confidence = np.asarray(confidence, dtype=float)
    if design not in DESIGNS:
        raise ValueError(f"design: unknown {design!r}; choose one of {', '.join(DESIGNS)}")
    if confidence.shape != (population,):
        raise ValueError(f"confidence: expected {population} values (one per document), got shape {confidence.shape}")
    if not 1 <= size <= population:
        raise ValueError(f"size: cannot draw {size} documents from a population of {population} (need at least 1)")
    if size == population:
        return np.arange(population), np.ones(population)
    rng = np.random.default_rng(seed)
    if design == "random":
        return np.sort(rng.choice(population, size=size, replace=False)), np.full(size, size / population)
    if design == "stratified":
        return _draw_stratified(predicted, size, rng)
    if not 0 < floor <= 1 or not np.all((confidence >= 0) & (confidence <= 1)):
        raise ValueError(f"floor must lie in (0, 1] (got {floor}) and every confidence in [0, 1]")
    pi = _poisson_probabilities(floor + 1 - confidence, size)
    drawn = np.flatnonzero(rng.random(population) < pi)
    return drawn, pi[drawn]


def _draw_stratified(predicted: list[str | None], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Simple random samples within each predicted label, allocated proportionally."""
    strata = np.array([ABSTAINED if p is None else p for p in predicted], dtype=object)
    names, index = np.unique(strata, return_inverse=True)
    if size < len(names):
        raise ValueError(f"size: {size} is fewer than the {len(names)} strata (predicted labels); "
                         "stratified sampling draws at least one document from each")
    counts = np.bincount(index)
    drawn, pi = [], []
    for h, n_h in enumerate(_allocate(counts, size)):
        drawn.append(rng.choice(np.flatnonzero(index == h), size=n_h, replace=False))
        pi.append(np.full(n_h, n_h / counts[h]))
    drawn, pi = np.concatenate(drawn), np.concatenate(pi)
    order = np.argsort(drawn)
    return drawn[order], pi[order]


def _allocate(counts: np.ndarray, size: int) -> np.ndarray:
    """Proportional allocation by largest remainder, then one document for any stratum left empty."""
    quota = size * counts / counts.sum()
    alloc = np.floor(quota).astype(int)
    alloc[np.argsort(alloc - quota, kind="stable")[: size - alloc.sum()]] += 1
    while (alloc == 0).any():
        donor = np.argmax(np.where(alloc > 1, alloc - quota, -np.inf))
        alloc[donor] -= 1
        alloc[np.flatnonzero(alloc == 0)[0]] += 1
    return alloc


def _poisson_probabilities(need: np.ndarray, size: int) -> np.ndarray:
    """π_i = min(1, c·need_i) summing to size: documents capped at 1 leave the others to share the rest."""
    capped = np.zeros(len(need), dtype=bool)
    while True:
        scale = (size - capped.sum()) / need[~capped].sum()
        newly = ~capped & (scale * need >= 1)
        if not newly.any():
            return np.where(capped, 1.0, scale * need)
        capped |= newly


def quality_report(*, gold: list[str], predicted: list[str | None], probs: np.ndarray, labels: list[str],
                   weights: np.ndarray, abstain_reasons: list[str | None], bins: int = 10,
                   coverages: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                   level: float = 0.95) -> dict:
    """Design-weighted (Hájek) accuracy, calibration and confusion of an annotator on a gold sample."""
    probs, weights = _check_distribution(probs, labels, len(gold)), _check_weights(weights, len(gold))
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
    correct_top = (_top_index(probs) == gold_column) & (gold_column >= 0)
    total = weights.sum()
    return {
        "n": len(gold), "weighted_n": float(total),
        "accuracy": _hajek((chosen == gold_arr)[answered], weights[answered], level),
        "top_label_accuracy": _hajek(correct_top, weights, level),
        "coverage": float(weights[answered].sum() / total),
        "abstention_rate": float(weights[~answered].sum() / total),
        "abstentions": _abstentions(gold_arr, answered, abstain_reasons, weights),
        "per_label": _per_label(gold_arr[answered], chosen[answered], weights[answered], labels),
        "confusion": _confusion(gold_arr, chosen, weights),
        **calibration(confidence, correct_top, weights, bins),
        "selective": [_selective(confidence, correct_top, weights, c) for c in coverages],
        "kappa": _kappa(gold_arr[answered], chosen[answered], weights[answered]),
    }


def _check_distribution(probs: np.ndarray, labels: list[str], n: int) -> np.ndarray:
    """The distribution matrix as floats, once its shape matches the documents and labels."""
    probs = np.asarray(probs, dtype=float)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels: expected distinct label names, got {labels}")
    if probs.shape != (n, len(labels)):
        raise ValueError(f"probs: expected shape ({n}, {len(labels)}) (documents × labels), got {probs.shape}")
    return probs


def _check_weights(weights: np.ndarray, n: int) -> np.ndarray:
    """Sampling weights as floats, once they are n positive finite numbers."""
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (n,) or not np.all(np.isfinite(weights) & (weights > 0)):
        raise ValueError(f"weights: expected {n} positive finite sampling weights (1/π), got shape {weights.shape}")
    return weights


def _interval(estimate: float, se: float | None, level: float) -> dict:
    """A normal-approximation interval as plain floats."""
    z = norm.ppf(0.5 + level / 2)
    low, high = (None, None) if se is None else (float(estimate - z * se), float(estimate + z * se))
    return {"estimate": float(estimate), "se": None if se is None else float(se), "low": low, "high": high}


def _clipped(interval: dict | None) -> dict | None:
    """A share's interval cut to [0, 1]."""
    if interval is None or interval["low"] is None:
        return interval
    return {**interval, "low": max(0.0, interval["low"]), "high": min(1.0, interval["high"])}


def _hajek(y: np.ndarray, w: np.ndarray, level: float) -> dict | None:
    """Weighted mean with its linearised ratio-estimator SE; None over no documents."""
    if len(y) == 0:
        return None
    y = y.astype(float)
    mean = (w * y).sum() / w.sum()
    n = len(y)
    se = np.sqrt(n / (n - 1) * np.sum((w * (y - mean)) ** 2)) / w.sum() if n > 1 else None
    return _interval(mean, se, level)


def _share(numerator: float, denominator: float) -> float | None:
    """A ratio, None when nothing is in the denominator."""
    return float(numerator / denominator) if denominator > 0 else None


def _abstentions(gold: np.ndarray, answered: np.ndarray, reasons: list[str | None], w: np.ndarray) -> list[dict]:
    """What the abstained documents really were, per abstain reason, most frequent first."""
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(~answered):
        groups.setdefault(reasons[i] or NO_REASON, []).append(i)
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
    threshold = confidence[order][min(np.searchsorted(reached, target - 1e-12), len(w) - 1)]
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
    weights = np.ones(n) if weights is None else _check_weights(weights, n)
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
    probs = _check_distribution(probs, labels, len(probs))
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
    weights = _check_weights(weights, len(confidence))
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
    result = {"target_accuracy": target_accuracy}
    for suffix, ok in (("", accuracy >= target_accuracy), ("_conservative", lower >= target_accuracy)):
        i = np.flatnonzero(ok)[-1] if ok.any() else None  # cuts run from high to low
        result["threshold" + suffix] = None if i is None else float(cuts[i])
        result["coverage" + suffix] = None if i is None else float(mass[i] / weights.sum())
        result["accuracy" + suffix] = None if i is None else float(accuracy[i])
    return result


def dsl_proportions(*, probs: np.ndarray, labels: list[str], gold_index: np.ndarray, pi: np.ndarray,
                    sampled: np.ndarray | None = None, folds: int = 5, seed: int = 0,
                    level: float = 0.95) -> list[dict]:
    """Share of each label in the population: DSL, naive (LLM top label) and gold-only estimates.

    ``sampled`` marks the gold sample; by default the documents with ``gold_index`` ≥ 0. Pass it when
    some gold labels fall outside the columns (``gold_index`` −1 on a sampled document).
    """
    probs, gold_index, pi, sampled = _check_dsl(probs, labels, gold_index, pi, sampled, folds)
    n = len(probs)
    g = _cross_fit(probs, gold_index, sampled, probs, folds, seed)
    onehot = (gold_index[:, None] == np.arange(len(labels))).astype(float)
    inverse = np.where(sampled, 1 / np.where(sampled, pi, 1), 0.0)
    pseudo = g + inverse[:, None] * (onehot - g)
    top = _top_index(probs)
    rows = []
    for k, label in enumerate(labels):
        naive = np.mean(top == k)
        rows.append({"label": label,
                     "dsl": _clipped(_interval(pseudo[:, k].mean(), pseudo[:, k].std(ddof=1) / np.sqrt(n), level)),
                     "naive": _clipped(_interval(naive, np.sqrt(naive * (1 - naive) / n), level)),
                     "gold_only": _clipped(_hajek(onehot[sampled, k], 1 / pi[sampled], level))})
    return rows


def dsl_regression(*, probs: np.ndarray, labels: list[str], gold_index: np.ndarray, pi: np.ndarray,
                   outcome: str, covariates: np.ndarray, names: list[str], model: str = "linear",
                   sampled: np.ndarray | None = None, folds: int = 5, seed: int = 0,
                   level: float = 0.95) -> list[dict]:
    """Coefficients of 1{label == outcome} on covariates (intercept first): DSL, naive and gold-only fits."""
    probs, gold_index, pi, sampled = _check_dsl(probs, labels, gold_index, pi, sampled, folds)
    if outcome not in labels or model not in MODELS:
        raise ValueError(f"outcome {outcome!r} must be one of {labels} and model {model!r} one of {list(MODELS)}")
    covariates = np.asarray(covariates, dtype=float)
    if covariates.ndim != 2 or covariates.shape[0] != len(probs) or len(names) != covariates.shape[1]:
        raise ValueError(f"covariates: expected a ({len(probs)}, {len(names)}) matrix (documents × names), "
                         f"got shape {covariates.shape}")
    k = labels.index(outcome)
    x = np.column_stack([np.ones(len(probs)), covariates])
    y = (gold_index == k).astype(float)
    g = _cross_fit(np.column_stack([probs, covariates]), np.where(y == 1, 0, -1), sampled, probs[:, [k]],
                   folds, seed)[:, 0]
    pseudo = g + np.where(sampled, (y - g) / np.where(sampled, pi, 1), 0.0)
    fits = {"dsl": _regress(x, pseudo, np.ones(len(x)), model),
            "naive": _regress(x, (_top_index(probs) == k).astype(float), np.ones(len(x)), model),
            "gold_only": _regress(x[sampled], y[sampled], 1 / pi[sampled], model)}
    return [{"name": name, **{key: _interval(beta[j], se[j], level) for key, (beta, se) in fits.items()}}
            for j, name in enumerate(["intercept", *names])]


def _check_dsl(probs, labels, gold_index, pi, sampled, folds) -> tuple[np.ndarray, ...]:
    """Arrays of one length, a valid design and enough gold in every fold, or a ValueError saying which."""
    gold_index = np.asarray(gold_index)
    probs = _check_distribution(probs, labels, len(gold_index))
    pi = np.asarray(pi, dtype=float)
    sampled = gold_index >= 0 if sampled is None else np.asarray(sampled, dtype=bool)
    if pi.shape != gold_index.shape or sampled.shape != gold_index.shape:
        raise ValueError(f"gold_index, pi and sampled must all have {len(gold_index)} entries (one per document)")
    if np.any((gold_index < -1) | (gold_index >= len(labels))) or np.any(~sampled & (gold_index >= 0)):
        raise ValueError("gold_index: expected a column index for sampled documents and −1 elsewhere")
    if not np.all((pi[sampled] > 0) & (pi[sampled] <= 1)):
        raise ValueError("pi: inclusion probabilities of sampled documents must lie in (0, 1]")
    if folds < 2 or sampled.sum() < 2 * folds:
        raise ValueError(f"need folds ≥ 2 and at least 2 gold documents per fold; got {sampled.sum()} gold "
                         f"documents for {folds} folds")
    return probs, gold_index, pi, sampled


def _top_index(probs: np.ndarray) -> np.ndarray:
    """Column of each row's top label, −1 for a blank row."""
    return np.where(probs.sum(axis=1) > 0, probs.argmax(axis=1), -1)


def _cross_fit(features: np.ndarray, target: np.ndarray, sampled: np.ndarray, surrogate: np.ndarray,
               folds: int, seed: int) -> np.ndarray:
    """Out-of-fold P(target == column) from a logistic regression on the gold outside each fold.

    Columns whose class a training fold lacks keep the surrogate's probability; target −1 is
    "none of the columns". Gold and non-gold documents are dealt round-robin into the folds.
    """
    rng = np.random.default_rng(seed)
    fold = np.empty(len(target), dtype=int)
    for group in (np.flatnonzero(sampled), np.flatnonzero(~sampled)):
        fold[rng.permutation(group)] = np.arange(len(group)) % folds
    g = surrogate.copy()
    for f in range(folds):
        train, test = sampled & (fold != f), np.flatnonzero(fold == f)
        if len(np.unique(target[train])) < 2:
            continue
        fitted = LogisticRegression(max_iter=1000).fit(features[train], target[train])
        proba = fitted.predict_proba(features[test])
        for j, column in enumerate(fitted.classes_):
            if column >= 0:
                g[test, column] = proba[:, j]
    return g


def _regress(x: np.ndarray, y: np.ndarray, w: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray]:
    """Weighted linear or logistic M-estimate of y on x, with sandwich (HC0) standard errors."""
    try:
        beta = np.linalg.solve(x.T @ (x * w[:, None]), x.T @ (w * y)) if model == "linear" else _newton(x, y, w)
        fitted = x @ beta if model == "linear" else expit(x @ beta)
        slope = w if model == "linear" else w * fitted * (1 - fitted)
        bread = np.linalg.inv(x.T @ (x * slope[:, None]))
    except np.linalg.LinAlgError as exc:
        raise ValueError("covariates: the design matrix is singular (collinear or constant columns)") from exc
    score = x * (w * (y - fitted))[:, None]
    return beta, np.sqrt(np.diag(bread @ score.T @ score @ bread))


def _newton(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Root of Σ w x (y − expit(xβ)) = 0; y may fall outside [0, 1] (DSL pseudo-outcomes)."""
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        mu = expit(x @ beta)
        step = np.linalg.solve(x.T @ (x * (w * mu * (1 - mu))[:, None]), x.T @ (w * (y - mu)))
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            return beta
    raise ValueError("logistic regression did not converge (an outcome perfectly separated by the covariates?)")
