"""Design-based supervised learning (DSL, Egami et al. 2023): label shares and regressions that stay valid
when the LLM is wrong, next to the naive and gold-only estimates.

The LLM's distribution is a surrogate, corrected on the gold sample by cross-fitted residuals
weighted by 1/π. Conventions as in ``service.quality.metrics``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from service.quality.metrics import check_distribution, clipped, hajek, interval, top_index
from service.vocabulary import RegressionModel, values

MODELS = values(RegressionModel)


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
    top = top_index(probs)
    rows = []
    for k, label in enumerate(labels):
        naive = np.mean(top == k)
        rows.append({"label": label,
                     "dsl": clipped(interval(pseudo[:, k].mean(), pseudo[:, k].std(ddof=1) / np.sqrt(n), level)),
                     "naive": clipped(interval(naive, np.sqrt(naive * (1 - naive) / n), level)),
                     "gold_only": clipped(hajek(onehot[sampled, k], 1 / pi[sampled], level))})
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
            "naive": _regress(x, (top_index(probs) == k).astype(float), np.ones(len(x)), model),
            "gold_only": _regress(x[sampled], y[sampled], 1 / pi[sampled], model)}
    return [{"name": name, **{key: interval(beta[j], se[j], level) for key, (beta, se) in fits.items()}}
            for j, name in enumerate(["intercept", *names])]


def _check_dsl(probs, labels, gold_index, pi, sampled, folds) -> tuple[np.ndarray, ...]:
    """Arrays of one length, a valid design and enough gold in every fold, or a ValueError saying which."""
    gold_index = np.asarray(gold_index)
    probs = check_distribution(probs, labels, len(gold_index))
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
