"""The refinement of a panel's labels by a regression on the documents' embeddings (service.labelling.refinement).

Synthetic arrays with a known truth: the function is pure, and what is under test is the
arithmetic of cross-fitting, not a model's quality (that is benchmarks/zero_shot.py's).
"""

from __future__ import annotations

import numpy as np
import pytest

from service.labelling.refinement import MIN_GOLD, _Correction, refine
from service.quality.dsl import dsl_proportions
from service.quality.sampling import draw_sample


def _job(rng: np.random.Generator, n: int, k: int, right: float, spread: float = 1.0):
    """Truth, features that carry it (class centres plus noise) and a panel right on a share ``right`` of documents."""
    truth = rng.integers(0, k, n)
    features = rng.normal(size=(k, 16))[truth] + rng.normal(scale=spread, size=(n, 16))
    voted = np.where(rng.random(n) < right, truth, rng.integers(0, k, n))
    probs = np.full((n, k), 0.4 / (k - 1))
    probs[np.arange(n), voted] = 0.6
    return truth, features, probs


def test_without_gold_the_regression_learns_the_panel_and_corrects_it():
    """A panel right on ~73% of 300 documents whose features cluster by class: the cross-fitted self-training
    corrects most of its errors (the noise is per document, the clusters are shared)."""
    truth, features, probs = _job(np.random.default_rng(0), 300, 3, right=0.6)
    refined, refinement = refine(probs, features, np.full(300, -1))
    assert refinement.trained_on == "panel labels" and refinement.gold_labels == 0
    before, after = np.mean(probs.argmax(1) == truth), np.mean(refined.argmax(1) == truth)
    assert after > before + 0.1, (before, after)


def test_a_regression_that_could_memorise_its_gold_labels_is_scored_cross_fitted():
    """Features that are pure noise (384 dimensions, 100 gold documents) let a regression fit its training labels
    perfectly; the gold accuracy it reports, and the labels gold documents get, stay at chance."""
    rng = np.random.default_rng(1)
    n = 400
    truth = rng.integers(0, 2, n)
    features = rng.normal(size=(n, 384))
    probs = np.full((n, 2), 0.5)
    probs[np.arange(n), rng.integers(0, 2, n)] = 0.55
    gold_index = np.full(n, -1)
    gold_index[:100] = truth[:100]
    refined, refinement = refine(probs, features, gold_index)
    assert refinement.trained_on == "gold labels" and refinement.gold_accuracy["refined"] < 0.7
    assert np.mean(refined[:100].argmax(1) == truth[:100]) < 0.7


def test_gold_labels_train_the_regression_and_lift_a_weak_panel():
    """A weak panel, informative features and 60 gold labels: the regression learns them and lifts the rest."""
    truth, features, probs = _job(np.random.default_rng(2), 300, 3, right=0.3)
    gold_index = np.full(300, -1)
    gold_index[:60] = truth[:60]
    refined, refinement = refine(probs, features, gold_index)
    assert refinement.trained_on == "gold labels" and refinement.gold_labels == 60
    assert set(refinement.gold_accuracy) == {"panel", "label_free", "refined"}
    assert refinement.gold_accuracy["refined"] > refinement.gold_accuracy["panel"]
    assert np.mean(refined[60:].argmax(1) == truth[60:]) > np.mean(probs[60:].argmax(1) == truth[60:]) + 0.2


@pytest.mark.parametrize("case", ["few documents", "one class", "few gold"])
def test_what_cannot_be_fitted_is_left_or_falls_back(case):
    """Under 10 documents or one voted class nothing is fitted; under MIN_GOLD gold labels the panel's labels train."""
    truth, features, probs = _job(np.random.default_rng(3), 100, 2, right=0.8)
    gold_index = np.full(100, -1)
    if case == "few documents":
        probs, features, gold_index = probs[:9], features[:9], gold_index[:9]
    elif case == "one class":
        probs = np.tile([0.7, 0.3], (100, 1))
    else:
        gold_index[: MIN_GOLD - 1] = truth[: MIN_GOLD - 1]
    refined, refinement = refine(probs, features, gold_index)
    if case == "few gold":
        assert refinement.trained_on == "panel labels" and refinement.gold_labels == 0
    else:
        assert refinement.trained_on == "nothing" and refined is probs


def test_dsl_covers_when_the_gold_sample_also_trains_the_labels():
    """DSL's 95% interval for a label share stays nominal when the labels it corrects were refined on the same gold.

    200 repetitions of the biased-annotator population of test_statistics (N = 2000, true share of "a"
    0.3, the LLM says "a" w.p. 0.6 if a and 0.25 if b) with 8 features that carry the class, a random
    gold sample of 200 that trains the refinement (cross-fitted) and then DSL on the refined
    distributions. Coverage must lie in [0.90, 0.99], three binomial SEs around 0.95 at R = 200.
    """
    covered = 0
    for r in range(200):
        rng = np.random.default_rng(r)
        truth = np.where(rng.random(2000) < 0.3, 0, 1)
        features = rng.normal(size=(2, 8))[truth] + rng.normal(scale=1.5, size=(2000, 8))
        says_a = rng.random(2000) < np.where(truth == 0, 0.6, 0.25)
        confidence = np.clip(np.where(says_a == (truth == 0), 0.8, 0.65) + rng.uniform(-0.15, 0.15, 2000), 0.5, 1.0)
        probs = np.where(says_a[:, None], np.column_stack([confidence, 1 - confidence]),
                         np.column_stack([1 - confidence, confidence]))
        drawn, pi_drawn = draw_sample(predicted=[None] * 2000, confidence=probs.max(axis=1), size=200,
                                      design="random", seed=int(rng.integers(2**31)))
        gold_index, pi = np.full(2000, -1), np.ones(2000)
        gold_index[drawn], pi[drawn] = truth[drawn], pi_drawn
        refined, _ = refine(probs, features, gold_index, seed=r)
        share = dsl_proportions(probs=refined, labels=["a", "b"], gold_index=gold_index, pi=pi, folds=2, seed=r)[0]
        covered += share["dsl"]["low"] <= 0.3 <= share["dsl"]["high"]
    assert 0.90 <= covered / 200 <= 0.99


def test_a_cancelled_job_s_unlabelled_documents_are_left_out():
    """Documents without an aggregate (a cancelled job) neither train nor get a label; the others are refined."""
    from conftest import REPO

    from service.labelling.labeller import decide_single
    from service.labelling.refinement import refined_annotations
    from service.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(REPO / "taxonomy" / "sms-spam.yaml")
    rng = np.random.default_rng(4)
    decided = {f"d{i}": decide_single({"spam": p, "ham": 1 - p}, taxonomy) for i, p in enumerate(rng.random(20))}
    documents = [{"doc_id": f"d{i}", "text": f"text {i}", "gold_label": None} for i in range(25)]
    out, refinement = refined_annotations(decided, documents, taxonomy, lambda texts: rng.normal(size=(len(texts), 8)))
    assert set(out) == set(decided) and refinement.trained_on == "panel labels"


def test_gold_labels_train_even_when_the_panel_gives_every_document_one_label():
    """The constant-annotator case: the panel says one label everywhere; 40 gold labels still train the regression."""
    truth, features, _ = _job(np.random.default_rng(5), 200, 3, right=1.0)
    probs = np.tile([0.8, 0.1, 0.1], (200, 1))
    gold_index = np.full(200, -1)
    gold_index[:40] = truth[:40]
    refined, refinement = refine(probs, features, gold_index)
    assert refinement.trained_on == "gold labels"
    assert np.mean(refined[40:].argmax(1) == truth[40:]) > np.mean(probs[40:].argmax(1) == truth[40:]) + 0.2


def test_the_gold_fit_corrects_the_labels_without_gold_rather_than_replacing_them():
    """The gold regression starts from the label-free labels (their log-probabilities are its offset) and its
    penalty pulls toward them: 30 labels that agree with them, over unit vectors that are noise, leave the other
    documents' labels as they were (but for near ties), where a regression fitted from scratch on noise guesses;
    60 labels that follow a direction of the vectors (label 2 wherever it is present) move the documents along it."""
    rng = np.random.default_rng(0)
    offset = np.log(rng.dirichlet([1, 1, 1], size=300))
    without_gold = offset.argmax(1)
    noise = rng.normal(size=(300, 64))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    kept = _Correction(noise[:30], offset[:30], without_gold[:30], 3).predict(noise[30:], offset[30:])
    assert np.mean(kept.argmax(1) == without_gold[30:]) >= 0.8
    present = rng.random(300) < 0.5
    vectors = noise.copy()
    vectors[present, 0] += 1.0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    truth = np.where(present, 2, without_gold)
    moved = _Correction(vectors[:60], offset[:60], truth[:60], 3).predict(vectors[60:], offset[60:])
    assert np.mean(moved.argmax(1) == truth[60:]) >= np.mean(without_gold[60:] == truth[60:]) + 0.1


def test_each_view_of_the_llm_s_reading_is_a_block_of_the_same_length_as_the_vectors():
    """``with_reading`` standardises each view of the reading per dimension (a dimension a thousand times larger
    than the rest does not drown the others; a constant one is zero, not NaN) and puts the views beside the
    vectors, each block of length 1/√3 for two views, so the regression's penalty treats the three alike."""
    from service.labelling.refinement import with_reading

    rng = np.random.default_rng(8)
    vectors = rng.normal(size=(50, 6))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    over = rng.normal(size=(50, 4)) * [1000.0, 1.0, 1.0, 0.0] + [5.0, 0.0, 0.0, 3.0]
    last = rng.normal(size=(50, 4)) * 50.0
    features = with_reading(vectors, np.stack([over, last], axis=1))
    assert features.shape == (50, 14) and np.isfinite(features).all()
    for block in (slice(0, 6), slice(6, 10), slice(10, 14)):
        assert np.linalg.norm(features[:, block], axis=1) == pytest.approx(np.full(50, 3 ** -0.5))
    assert np.all(features[:, 9] == 0) and features[:, 6].std() < 3 * features[:, 7].std()


def test_a_job_is_refined_on_its_llm_s_reading_and_without_it_when_reading_fails():
    """``refined_annotations`` reads the texts with the job's LLM when given a reader, and says so; a reader that
    could not read (None: a replica lost, ``handle_reader``) leaves the encoder's vectors alone, and the labels are
    refined all the same; a job too small to refine does not claim the reading."""
    from conftest import REPO

    from service.labelling.labeller import decide_single
    from service.labelling.refinement import refined_annotations
    from service.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(REPO / "taxonomy" / "sms-spam.yaml")
    rng = np.random.default_rng(9)
    decided = {f"d{i}": decide_single({"spam": p, "ham": 1 - p}, taxonomy) for i, p in enumerate(rng.random(30))}
    documents = [{"doc_id": f"d{i}", "text": f"text {i}", "gold_label": None} for i in range(30)]
    seen: list[list[str]] = []

    def read(texts: list[str]) -> np.ndarray:
        seen.append(texts)
        return rng.normal(size=(len(texts), 2, 5))

    def lost(texts: list[str]) -> None:
        return None

    embed = lambda texts: rng.normal(size=(len(texts), 8))  # noqa: E731
    _, read_by = refined_annotations(decided, documents, taxonomy, embed, read)
    assert read_by.read_by_llm and read_by.trained_on == "panel labels" and seen == [[d["text"] for d in documents]]
    out, alone = refined_annotations(decided, documents, taxonomy, embed, lost)
    assert not alone.read_by_llm and alone.trained_on == "panel labels" and set(out) == set(decided)
    few = {doc_id: decided[doc_id] for doc_id in list(decided)[:5]}
    _, nothing = refined_annotations(few, documents[:5], taxonomy, embed, read)
    assert nothing.trained_on == "nothing" and not nothing.read_by_llm


def test_a_model_that_cannot_read_gives_none_and_the_aggregation_goes_on(caplog):
    """``handle_reader`` turns a failed reading call into None and a warning. The handle is a stand-in: a Ray
    replica dying on cue cannot be staged here; what is under test is the wrapper's contract."""
    from service.engines.base import ScoreRequest
    from service.serve.app import handle_reader

    class Died:
        def remote(self, requests):
            return self

        def result(self, timeout_s=None):
            raise RuntimeError("The actor died unexpectedly before finishing this task.")

    class Handle:
        read = Died()

    request = ScoreRequest("Is the text spam?", "a text", ("spam", "ham"))
    assert handle_reader(Handle())([request]) is None  # type: ignore[arg-type]
    assert "could not read" in caplog.text
