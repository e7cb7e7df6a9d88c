"""Statistics of service.quality (sampling, metrics, conformal, dsl) checked by computation: seeded simulations with known truths,
sklearn's weighted metrics, crepes and brute force; no hard-coded results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from crepes import ConformalClassifier
from sklearn.metrics import accuracy_score, cohen_kappa_score, precision_recall_fscore_support

from service.quality.conformal import abstention_threshold, apply_threshold, conformal_sets
from service.quality.dsl import dsl_proportions, dsl_regression
from service.quality.metrics import TIE_DECIMALS, quality_report
from service.quality.sampling import draw_sample

LABELS = ["a", "b", "c", "d"]
DRAWS = 2000  # seeded draws per design in the inclusion-frequency test
Z_FAMILY = 4.5  # |z| bound over ~120 simultaneous binomial checks: P(any false alarm) < 1e-3


def _calibrated(rng: np.random.Generator, n: int, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Distributions and true labels drawn from them, so the probabilities are calibrated."""
    probs = rng.dirichlet(np.full(k, 0.7), n)
    truth = np.minimum((rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1), k - 1)
    return probs, truth


def _population_for_sampling(rng: np.random.Generator) -> tuple[list[str | None], np.ndarray]:
    """40 documents: ten blank-ish ones of confidence 0 and thirty confident ones with mixed predictions."""
    confidence = np.concatenate([np.zeros(10), rng.uniform(0.5, 1.0, 30)])
    predicted = [None] * 10 + [LABELS[i % 3] for i in range(30)]
    return predicted, confidence


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("design", ["random", "stratified", "uncertainty"])
def test_inclusion_frequencies_match_pi(design):
    """Over 2000 seeded draws each document is drawn as often as its π says (within 4.5 binomial SEs)."""
    predicted, confidence = _population_for_sampling(np.random.default_rng(1))
    size = 20
    hits, pi = np.zeros(len(predicted)), np.full(len(predicted), np.nan)
    sizes = []
    for seed in range(DRAWS):
        drawn, p = draw_sample(predicted=predicted, confidence=confidence, size=size, design=design, seed=seed)
        hits[drawn] += 1
        assert np.all(np.isnan(pi[drawn]) | np.isclose(pi[drawn], p)), "π of a document changed between draws"
        pi[drawn] = p
        sizes.append(len(drawn))
    freq = hits / DRAWS
    se = np.sqrt(pi * (1 - pi) / DRAWS)
    assert np.all(np.abs(freq - pi) <= Z_FAMILY * se + 1e-12)
    if design == "uncertainty":
        assert np.any(pi == 1), "the set-up should exercise the cap at π = 1"
        assert np.all(pi[:10] > pi[10:].max()), "low confidence must be over-weighted"
        assert abs(np.mean(sizes) - size) <= Z_FAMILY * np.sqrt(np.sum(pi * (1 - pi)) / DRAWS)
    else:
        assert set(sizes) == {size}
        assert np.isclose(pi.sum(), size)  # fixed-size designs: Σπ = n


def test_stratified_allocation_is_proportional_with_one_per_stratum():
    """Largest-remainder allocation: exact quotas when they are whole, and every stratum gets at least one."""
    predicted = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + [None] * 5
    drawn, pi = draw_sample(predicted=predicted, confidence=np.ones(100), size=20, design="stratified", seed=3)
    strata = np.array(["(abstained)" if p is None else p for p in predicted])[drawn]
    assert {s: int((strata == s).sum()) for s in set(strata)} == {"a": 10, "b": 6, "c": 3, "(abstained)": 1}
    assert np.allclose(pi, 20 / 100)  # proportional allocation: every π_h = n/N

    predicted = ["a"] * 90 + ["b"] * 9 + ["c"]  # quotas 9, 0.9, 0.1 → 9, 1, 0 → c takes one from a
    drawn, pi = draw_sample(predicted=predicted, confidence=np.ones(100), size=10, design="stratified", seed=3)
    counts = {s: int(np.sum(np.array(predicted)[drawn] == s)) for s in "abc"}
    assert counts == {"a": 8, "b": 1, "c": 1}
    assert np.allclose(pi, [{"a": 8 / 90, "b": 1 / 9, "c": 1.0}[predicted[i]] for i in drawn])


def test_sampling_edge_cases_and_errors():
    """The whole population has π = 1, draws repeat for a seed, and bad sizes or designs say what is wrong."""
    predicted, confidence = _population_for_sampling(np.random.default_rng(2))
    for design in ("random", "stratified", "uncertainty"):
        drawn, pi = draw_sample(predicted=predicted, confidence=confidence, size=40, design=design)
        assert list(drawn) == list(range(40)) and np.all(pi == 1)
        first = draw_sample(predicted=predicted, confidence=confidence, size=12, design=design, seed=7)
        again = draw_sample(predicted=predicted, confidence=confidence, size=12, design=design, seed=7)
        assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    with pytest.raises(ValueError, match=r"41.*40"):
        draw_sample(predicted=predicted, confidence=confidence, size=41, design="random")
    with pytest.raises(ValueError, match="at least 1"):
        draw_sample(predicted=predicted, confidence=confidence, size=0, design="random")
    with pytest.raises(ValueError, match="strata"):
        draw_sample(predicted=predicted, confidence=confidence, size=3, design="stratified")
    with pytest.raises(ValueError, match="random, stratified, uncertainty"):
        draw_sample(predicted=predicted, confidence=confidence, size=3, design="cluster")


# ---------------------------------------------------------------- quality report

def _gold_sample(seed: int = 0, n: int = 400):
    """A weighted gold sample with abstentions, blank rows and a gold label outside the taxonomy."""
    rng = np.random.default_rng(seed)
    probs, truth = _calibrated(rng, n)
    probs[:8] = 0.0  # blank documents
    gold = [LABELS[t] for t in truth]
    for i in rng.choice(n, 20, replace=False):
        gold[i] = "none_of_these"
    confidence = probs.max(axis=1)
    predicted = [None if c < 0.45 else LABELS[int(np.argmax(p))] for c, p in zip(confidence, probs)]
    reasons = ["empty_text" if i < 8 else ("below_threshold" if predicted[i] is None else None) for i in range(n)]
    return gold, predicted, probs, rng.uniform(1, 5, n), reasons


def test_quality_report_matches_sklearn_weighted_metrics():
    """Accuracy, per-label precision/recall/F1/support and kappa equal sklearn's with sample_weight."""
    gold, predicted, probs, weights, reasons = _gold_sample()
    report = quality_report(gold=gold, predicted=predicted, probs=probs, labels=LABELS, weights=weights,
                            abstain_reasons=reasons)
    json.dumps(report)  # JSON-able: plain types only
    answered = np.array([p is not None for p in predicted])
    g, p, w = np.array(gold)[answered], np.array([x for x in predicted if x is not None]), weights[answered]
    assert report["n"] == len(gold) and np.isclose(report["weighted_n"], weights.sum())
    assert np.isclose(report["accuracy"]["estimate"], accuracy_score(g, p, sample_weight=w))
    top = np.where(probs.sum(axis=1) > 0, np.array(LABELS)[probs.argmax(axis=1)], "(blank)")
    assert np.isclose(report["top_label_accuracy"]["estimate"], accuracy_score(gold, top, sample_weight=weights))
    assert np.isclose(report["coverage"], w.sum() / weights.sum())
    assert np.isclose(report["coverage"] + report["abstention_rate"], 1)
    classes = LABELS + ["none_of_these"]
    precision, recall, f1, support = precision_recall_fscore_support(g, p, labels=classes, sample_weight=w,
                                                                     zero_division=np.nan)
    rows = {r["label"]: r for r in report["per_label"]}
    assert list(rows) == classes and rows["none_of_these"]["precision"] is None
    for k, label in enumerate(classes):
        for key, expected in (("precision", precision[k]), ("recall", recall[k]), ("f1", f1[k])):
            got = rows[label][key]
            assert (got is None and np.isnan(expected)) or np.isclose(got, expected), (label, key)
        assert np.isclose(rows[label]["weighted_support"], support[k])
        assert rows[label]["support"] == int(np.sum(g == label))
    assert np.isclose(report["kappa"], cohen_kappa_score(g, p, sample_weight=w))


def test_quality_report_tables_by_brute_force():
    """ECE and reliability bins, confusion cells, abstentions and selective accuracy recomputed by loops."""
    gold, predicted, probs, weights, reasons = _gold_sample(seed=1)
    report = quality_report(gold=gold, predicted=predicted, probs=probs, labels=LABELS, weights=weights,
                            abstain_reasons=reasons, bins=10)
    bins: dict[int, list[tuple[float, float, float]]] = {}
    for i in range(len(gold)):
        conf = float(max(probs[i]))
        right = conf > 0 and LABELS[int(np.argmax(probs[i]))] == gold[i]
        bins.setdefault(min(int(conf * 10), 9), []).append((weights[i], conf, float(right)))
    ece = 0.0
    for b, rows in sorted(bins.items()):
        total = sum(r[0] for r in rows)
        conf = sum(r[0] * r[1] for r in rows) / total
        acc = sum(r[0] * r[2] for r in rows) / total
        ece += total / weights.sum() * abs(acc - conf)
        entry = next(e for e in report["reliability"] if e["bin"] == b)
        assert entry["n"] == len(rows) and np.isclose(entry["confidence"], conf) and np.isclose(entry["accuracy"], acc)
    assert len(report["reliability"]) == len(bins) and np.isclose(report["ece"], ece)

    cells: dict[tuple[str, str], float] = {}
    for g, p, w in zip(gold, predicted, weights):
        cells[(g, p or "(abstained)")] = cells.get((g, p or "(abstained)"), 0.0) + w
    assert {(c["gold"], c["predicted"]): c["weighted_n"] for c in report["confusion"]} == pytest.approx(cells)

    reasons_seen = {r["reason"]: r for r in report["abstentions"]}
    for reason in ("empty_text", "below_threshold"):
        idx = [i for i in range(len(gold)) if reasons[i] == reason]
        assert reasons_seen[reason]["n"] == len(idx)
        assert sum(reasons_seen[reason]["gold_labels"].values()) == len(idx)
        assert np.isclose(reasons_seen[reason]["weighted_share"], weights[idx].sum() / weights.sum())

    selective = {s["coverage"]: s for s in report["selective"]}
    full = report["selective"][-1]
    assert full["n"] == len(gold) and np.isclose(full["coverage"], 1.0)
    assert np.isclose(full["accuracy"], report["top_label_accuracy"]["estimate"])
    for target, s in zip((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), report["selective"]):
        kept = np.round(probs.max(axis=1), TIE_DECIMALS) >= s["threshold"]  # ties are equal to 9 decimals
        assert s["coverage"] >= target - 1e-9 and kept.sum() == s["n"]
        assert np.isclose(s["coverage"], weights[kept].sum() / weights.sum())
    assert len(selective) == len(report["selective"])


def test_accuracy_se_with_equal_weights_is_the_binomial_se():
    """With equal weights the linearised SE of a share p reduces to sqrt(p(1 − p)/(n − 1))."""
    gold, predicted, probs, _, reasons = _gold_sample(seed=2)
    report = quality_report(gold=gold, predicted=predicted, probs=probs, labels=LABELS, weights=np.full(400, 7.0),
                            abstain_reasons=reasons)
    n = sum(p is not None for p in predicted)
    p = report["accuracy"]["estimate"]
    assert np.isclose(report["accuracy"]["se"], np.sqrt(p * (1 - p) / (n - 1)))
    assert np.isclose(report["accuracy"]["high"] - p, 1.959964 * report["accuracy"]["se"])


# ---------------------------------------------------------------- conformal sets

def test_threshold_reproduces_crepes_sets():
    """The threshold fitted on all gold gives on new rows exactly crepes' unsmoothed prediction sets."""
    rng = np.random.default_rng(5)
    probs, truth = _calibrated(rng, 150)
    new_probs, _ = _calibrated(rng, 100)
    for alpha in (0.05, 0.1, 0.3):
        threshold = conformal_sets(probs=probs, gold_index=truth, alpha=alpha, splits=1)["threshold"]
        cc = ConformalClassifier().fit(1 - probs[np.arange(150), truth])
        expected = cc.predict_set(1 - new_probs, confidence=1 - alpha, smoothing=False).astype(bool)
        sets = apply_threshold(new_probs, LABELS, threshold)
        assert [set(s) for s in sets] == [{LABELS[k] for k in np.flatnonzero(row)} for row in expected]
        assert all(list(s) == sorted(s, key=lambda lab: -p[LABELS.index(lab)]) for s, p in zip(sets, new_probs))


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_split_conformal_coverage_on_calibrated_data(alpha):
    """Mean held-out coverage over 200 random half splits lies in [1−α, 1−α + 1/(n_cal+1)] ± tol.

    Random splits of a fixed data set make calibration and test exchangeable, so the expected
    coverage is ≥ 1−α (and ≤ 1−α + 1/(n_cal+1) without ties). tol = 3 Monte-Carlo SEs of the mean
    over splits, sqrt(α(1−α)(1/n_cal + 1/n_test)/splits).
    """
    for seed in range(3):
        probs, truth = _calibrated(np.random.default_rng(seed), 200)
        result = conformal_sets(probs=probs, gold_index=truth, alpha=alpha, seed=seed, splits=200)
        n_cal, n_test = result["n_calibration"], result["n_test"]
        tol = 3 * np.sqrt(alpha * (1 - alpha) * (1 / n_cal + 1 / n_test) / 200)
        assert 1 - alpha - tol <= result["mean_coverage"] <= 1 - alpha + 1 / (n_cal + 1) + tol
        assert 1 <= result["mean_set_size"] <= len(LABELS)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_weighted_conformal_keeps_population_coverage_under_uncertainty_sampling(alpha):
    """Calibrated on an uncertainty-design gold sample weighted by 1/π, the threshold covers ≥ 1−α of the
    whole population (mean over 30 populations; tol = 3 SEs of that mean from the observed spread)."""
    coverage = []
    for r in range(30):
        probs, truth = _calibrated(np.random.default_rng(100 + r), 3000)
        drawn, pi = draw_sample(predicted=[None] * 3000, confidence=probs.max(axis=1), size=300,
                                design="uncertainty", seed=r)
        result = conformal_sets(probs=probs[drawn], gold_index=truth[drawn], alpha=alpha, weights=1 / pi,
                                seed=r, splits=20)
        coverage.append(np.mean(probs[np.arange(3000), truth] >= result["threshold"] - 1e-12))
    tol = 3 * np.std(coverage, ddof=1) / np.sqrt(len(coverage))
    assert np.mean(coverage) >= 1 - alpha - tol


def test_conformal_gold_outside_columns_and_errors():
    """Gold labels outside the columns are never covered; tiny samples and bad alpha are refused."""
    probs, _ = _calibrated(np.random.default_rng(9), 40)
    result = conformal_sets(probs=probs, gold_index=np.full(40, -1), alpha=0.1, splits=5)
    assert result["threshold"] == 0.0 and result["mean_coverage"] == 0.0
    with pytest.raises(ValueError, match="at least 10"):
        conformal_sets(probs=probs[:9], gold_index=np.zeros(9, dtype=int), alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        conformal_sets(probs=probs, gold_index=np.zeros(40, dtype=int), alpha=1.0)


# ---------------------------------------------------------------- abstention threshold

def test_abstention_threshold_by_brute_force():
    """The plain cut-off is the lowest confidence whose kept documents reach the target; the Wilson one is
    never lower; an unreachable target gives None."""
    rng = np.random.default_rng(11)
    probs, truth = _calibrated(rng, 500)
    confidence = np.round(probs.max(axis=1), TIE_DECIMALS)  # ties are equal to 9 decimals
    correct, weights = probs.argmax(axis=1) == truth, rng.uniform(1, 3, 500)
    result = abstention_threshold(confidence=confidence, correct=correct, weights=weights, target_accuracy=0.8)
    reaching = [t for t in sorted(set(confidence))
                if np.average(correct[confidence >= t], weights=weights[confidence >= t]) >= 0.8]
    kept = confidence >= reaching[0]
    assert result["threshold"] == reaching[0]
    assert np.isclose(result["coverage"], weights[kept].sum() / weights.sum())
    assert np.isclose(result["accuracy"], np.average(correct[kept], weights=weights[kept]))
    assert result["threshold_conservative"] >= result["threshold"]
    assert result["accuracy_conservative"] >= 0.8
    none = abstention_threshold(confidence=confidence, correct=np.zeros(500), weights=weights, target_accuracy=0.5)
    assert none["threshold"] is None and none["threshold_conservative"] is None


# ---------------------------------------------------------------- DSL

REPETITIONS = 200
FOLDS = 2  # two cross-fitting folds keep 200 repetitions fast; validity does not depend on the fold count


def _llm_probs(rng: np.random.Generator, says_a: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two-label distributions: about 0.8 on the chosen label when right, 0.65 when wrong, plus noise."""
    confidence = np.clip(np.where(right, 0.8, 0.65) + rng.uniform(-0.15, 0.15, len(says_a)), 0.5, 1.0)
    return np.where(says_a[:, None], np.column_stack([confidence, 1 - confidence]),
                    np.column_stack([1 - confidence, confidence]))


def _gold(rng: np.random.Generator, probs: np.ndarray, truth: np.ndarray, design: str) -> tuple[np.ndarray, np.ndarray]:
    """gold_index (−1 off-sample) and π for a 200-document gold sample under a design.

    The design's seed comes from the population's generator: reusing the population's own seed
    would replay the uniforms that made the truth and couple the sample to it.
    """
    drawn, pi_drawn = draw_sample(predicted=[None] * len(truth), confidence=probs.max(axis=1), size=200,
                                  design=design, seed=int(rng.integers(2**31)))
    gold_index, pi = np.full(len(truth), -1), np.ones(len(truth))
    gold_index[drawn], pi[drawn] = truth[drawn], pi_drawn
    return gold_index, pi


def _covers(interval: dict, truth: float) -> bool:
    """Whether an interval dict holds a value."""
    return interval["low"] <= truth <= interval["high"]


@pytest.mark.parametrize("design", ["random", "uncertainty"])
def test_dsl_share_covers_where_naive_misses(design):
    """A biased annotator: naive 95% intervals miss the true share; DSL's cover it about 95% of the time.

    Each of 200 repetitions draws N = 2000 documents, true share of "a" 0.3; the LLM says "a" with
    probability 0.6 when true is "a" and 0.25 when "b" (naive share ≈ 0.355), and is less confident
    when wrong, so the uncertainty design over-samples its errors (π varies up to 5.5-fold). Gold:
    200 documents. DSL coverage must lie in [0.90, 0.99], three binomial SEs around 0.95 at R = 200.
    """
    covered = {"naive": 0, "dsl": 0, "gold_only": 0}
    for r in range(REPETITIONS):
        rng = np.random.default_rng(r)
        truth_a = rng.random(2000) < 0.3
        says_a = rng.random(2000) < np.where(truth_a, 0.6, 0.25)
        probs = _llm_probs(rng, says_a, says_a == truth_a)
        gold_index, pi = _gold(rng, probs, np.where(truth_a, 0, 1), design)
        share_a = dsl_proportions(probs=probs, labels=["a", "b"], gold_index=gold_index, pi=pi, folds=FOLDS, seed=r)[0]
        for key in covered:
            covered[key] += _covers(share_a[key], 0.3)
    rates = {key: float(n / REPETITIONS) for key, n in covered.items()}
    print(f"share of 'a', {design} design, coverage of 95% intervals: {rates}")
    assert rates["naive"] < 0.5
    assert 0.90 <= rates["dsl"] <= 0.99


@pytest.mark.parametrize("design", ["random", "uncertainty"])
@pytest.mark.parametrize("model", ["linear", "logistic"])
def test_dsl_slope_covers_where_naive_misses(design, model):
    """A covariate x ~ Bernoulli(0.5) raises the true share of "a" from 0.2 to 0.4; the LLM's bias depends on x
    (x = 0: says "a" w.p. 0.6 if a, 0.25 if b; x = 1: 0.5 and 0.05), so the naive slope is about −0.09 instead
    of +0.2 (linear) or log(8/3) (logistic). DSL's 95% interval for the slope covers the truth in [0.90, 0.99]
    of 200 repetitions (three binomial SEs around 0.95); naive's in under half."""
    true_slope = 0.2 if model == "linear" else np.log(0.4 / 0.6 * 0.8 / 0.2)
    covered = {"naive": 0, "dsl": 0, "gold_only": 0}
    for r in range(REPETITIONS):
        rng = np.random.default_rng(10_000 + r)
        x = rng.integers(0, 2, 2000)
        truth_a = rng.random(2000) < np.where(x == 1, 0.4, 0.2)
        says_a = rng.random(2000) < np.where(truth_a, np.where(x == 1, 0.5, 0.6), np.where(x == 1, 0.05, 0.25))
        probs = _llm_probs(rng, says_a, says_a == truth_a)
        gold_index, pi = _gold(rng, probs, np.where(truth_a, 0, 1), design)
        slope = dsl_regression(probs=probs, labels=["a", "b"], gold_index=gold_index, pi=pi, outcome="a",
                               covariates=x[:, None].astype(float), names=["x"], model=model, folds=FOLDS, seed=r)[1]
        assert slope["name"] == "x"
        for key in covered:
            covered[key] += _covers(slope[key], true_slope)
    rates = {key: float(n / REPETITIONS) for key, n in covered.items()}
    print(f"slope, {model} model, {design} design, coverage of 95% intervals: {rates}")
    assert rates["naive"] < 0.5
    assert 0.90 <= rates["dsl"] <= 0.99


def test_dsl_falls_back_to_the_surrogate_when_gold_has_one_class():
    """With only "a" in the gold sample, g is the LLM's own column and DSL is its mean plus the 1/π-weighted
    correction: mean(p_a) + Σ_sampled (1 − p_a)/π / N. π off the sample is unused (NaN here)."""
    rng = np.random.default_rng(4)
    probs, _ = _calibrated(rng, 300, k=2)
    sampled = rng.random(300) < 0.2
    gold_index, pi = np.where(sampled, 0, -1), np.where(sampled, 0.2, np.nan)
    share_a = dsl_proportions(probs=probs, labels=["a", "b"], gold_index=gold_index, pi=pi, folds=2)[0]
    expected = probs[:, 0].mean() + np.sum((1 - probs[sampled, 0]) / 0.2) / 300
    assert np.isclose(share_a["dsl"]["estimate"], expected)


def test_dsl_with_gold_labels_outside_the_columns():
    """20% of documents belong to no column; passing `sampled` lets DSL estimate both shares (truth inside
    99.9% intervals), while the naive shares must sum to 1."""
    rng = np.random.default_rng(6)
    truth = rng.choice(3, size=4000, p=[0.3, 0.5, 0.2])  # 2 = outside the columns
    says_a = np.where(truth == 2, rng.random(4000) < 0.5, rng.random(4000) < np.where(truth == 0, 0.8, 0.1))
    probs = _llm_probs(rng, says_a, says_a == (truth == 0))
    sampled = rng.random(4000) < 0.2
    gold_index = np.where(sampled & (truth < 2), truth, -1)
    rows = dsl_proportions(probs=probs, labels=["a", "b"], gold_index=gold_index, pi=np.full(4000, 0.2),
                           sampled=sampled, level=0.999)
    assert _covers(rows[0]["dsl"], 0.3) and _covers(rows[1]["dsl"], 0.5)
    assert np.isclose(rows[0]["naive"]["estimate"] + rows[1]["naive"]["estimate"], 1)


def test_dsl_errors_say_what_is_wrong():
    """Unknown outcome, too little gold, mismatched shapes and π outside (0, 1] raise ValueError."""
    rng = np.random.default_rng(8)
    probs, truth = _calibrated(rng, 100, k=2)
    gold_index = np.where(np.arange(100) < 30, truth, -1)
    pi = np.full(100, 0.3)
    common = {"probs": probs, "labels": ["a", "b"], "pi": pi}
    with pytest.raises(ValueError, match="outcome"):
        dsl_regression(**common, gold_index=gold_index, outcome="z", covariates=np.ones((100, 1)), names=["x"])
    with pytest.raises(ValueError, match="per fold"):
        dsl_proportions(**common, gold_index=np.where(np.arange(100) < 5, truth, -1), folds=5)
    with pytest.raises(ValueError, match="100 entries"):
        dsl_proportions(**common, gold_index=gold_index, sampled=gold_index[:90] >= 0)
    with pytest.raises(ValueError, match="pi"):
        dsl_proportions(probs=probs, labels=["a", "b"], gold_index=gold_index, pi=np.full(100, 1.5))
    with pytest.raises(ValueError, match="covariates"):
        dsl_regression(**common, gold_index=gold_index, outcome="a", covariates=np.ones((90, 1)), names=["x"])
