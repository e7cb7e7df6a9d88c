"""Ranking likely label errors, so a person reviews the most suspicious labels first.

Confident learning (cleanlab) needs, for each labelled document, class probabilities
that did not see its label:

- gold labels: the LLM's distribution is such a prediction (the LLM never saw the human
  label); a human label the LLM finds very unlikely is suspicious;
- the LLM's own labels: a logistic regression on all-MiniLM-L6-v2 embeddings, fitted
  with cross-validation (each document predicted by a model that did not train on it),
  is the independent second opinion.

``quality`` is cleanlab's self-confidence label quality (low is suspicious) and
``is_issue`` its confident-learning verdict. ``disagreement`` is the share of the other
opinions that differ from the label: the other people for gold labels, the other
annotators' votes for the LLM's labels. ``suspicion`` = 1 − quality, averaged with the
disagreement where there is any; rows are ranked by it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from service.store import Store
from service.store.jobs import Job
from service.taxonomy import NONE_LABEL

FOLDS = 5


def rank_gold_issues(data) -> dict:
    """Gold labels ranked by how unlikely the LLM finds them (``data`` is a ``quality.GoldData``)."""
    gold_index = data.gold_index()
    mass = data.probs.sum(axis=1)
    keep = np.flatnonzero(data.gold & (gold_index >= 0) & (mass > 0))
    if len(set(gold_index[keep].tolist())) < 2:  # confident learning compares classes: one is nothing to rank
        return {"checked": 0, "rows": []}
    agreement = np.array([1.0 if a is None else a for a in data.columns["human_agreement"]])
    return {"checked": len(keep), "rows": _rank(
        [data.columns["doc_id"][i] for i in keep], gold_index[keep], data.probs[keep] / mass[keep, None],
        data.options, disagreement=1 - agreement[keep])}


def rank_llm_issues(store: Store, job_id: str, *, max_documents: int, seed: int,
                    embed: Callable[[list[str]], np.ndarray]) -> dict:
    """The job's labels ranked against a cross-validated embedding classifier and the annotators' votes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    job = store.jobs.get(job_id)
    taxonomy = store.taxonomies.get(job.taxonomy, job.taxonomy_version).taxonomy
    columns = store.quality.population(job_id, taxonomy.label_names(), with_text=True)
    labelled = [i for i, label in enumerate(columns["label"]) if label is not None and label != NONE_LABEL]
    if len(labelled) > max_documents:
        labelled = sorted(np.random.default_rng(seed).choice(labelled, size=max_documents, replace=False).tolist())
    labels = np.array([columns["label"][i] for i in labelled])
    classes, counts = np.unique(labels, return_counts=True)
    classes = classes[counts >= 2]  # a class needs two documents to be predicted out of fold
    keep = [j for j, label in enumerate(labels) if label in set(classes)]
    if len(classes) < 2:
        return {"checked": 0, "rows": []}
    folds = int(min(FOLDS, counts[counts >= 2].min()))
    y = np.searchsorted(classes, labels[keep])
    features = embed([columns["text"][labelled[j]] for j in keep])
    probs = cross_val_predict(LogisticRegression(max_iter=1000), features, y, method="predict_proba",
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    doc_ids = [columns["doc_id"][labelled[j]] for j in keep]
    return {"checked": len(keep), "rows": _rank(doc_ids, y, probs, list(classes),
                                                disagreement=_vote_disagreement(store, job, doc_ids, labels[keep]))}


def _vote_disagreement(store: Store, job: Job, doc_ids: list[str], labels: np.ndarray) -> np.ndarray:
    """Share of the annotators' votes on each document that differ from its label (0 with one annotator)."""
    if len(job.annotators) < 2:
        return np.zeros(len(doc_ids))
    votes: dict[str, list[str]] = {}
    for row in store.annotations.member_rows(job.job_id):
        if row["status"] == "ok" and not row["abstained"] and row["label"] is not None:
            votes.setdefault(row["doc_id"], []).append(row["label"])
    return np.array([np.mean([v != label for v in votes.get(doc, [])]) if votes.get(doc) else 0.0
                     for doc, label in zip(doc_ids, labels)])


def _rank(doc_ids: list[str], given: np.ndarray, probs: np.ndarray, names: list[str], *,
          disagreement: np.ndarray) -> list[dict]:
    """Rows of label issues, most suspicious first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if len(doc_ids) == 0:
        return []
    with warnings.catch_warnings():  # cleanlab warns about rare classes; the ranking still holds
        warnings.simplefilter("ignore")
        quality = get_label_quality_scores(given, probs)
        # n_jobs=1: cleanlab's default forks a multiprocessing pool, which can deadlock in a threaded server process
        flagged = (find_label_issues(given, probs, n_jobs=1) if len(doc_ids) >= 2 * probs.shape[1]
                   else quality < 0.5)
    suspicion = np.where(disagreement > 0, (1 - quality + disagreement) / 2, 1 - quality)
    order = np.argsort(-suspicion, kind="stable")
    return [{"rank": r + 1, "doc_id": doc_ids[i], "given_label": names[given[i]],
             "suggested_label": names[int(probs[i].argmax())], "quality": float(quality[i]),
             "disagreement": float(disagreement[i]), "suspicion": float(suspicion[i]), "is_issue": bool(flagged[i])}
            for r, i in enumerate(order)]
