"""Aggregation of several annotators' votes into one label per document, and their agreement.

Methods (``METHODS``):
- ``majority_vote``: the share of votes each label got (crowd-kit ``MajorityVote``).
- ``weighted_soft_vote``: the weighted mean of the annotators' distributions; an annotator's
  weight is the one given in the job, else its agreement with the others as crowd-kit's
  ``Wawa`` estimates it (accuracy against the majority vote), so no gold label is needed.
- ``dawid_skene``: the Dawid–Skene label model (crowd-kit ``DawidSkene``), which estimates
  each annotator's confusion matrix by EM without gold labels; its posterior is the distribution.
- ``calibrated_mean``: the weighted mean (job weights, else 1) of the distributions after each
  untuned LLM annotator's are batch-calibrated over the job (Zhou et al. 2024, "Batch Calibration"):
  divided label by label by that annotator's mean distribution over the job's documents,
  then renormalised. That cancels a prompt's pull toward one label, and an annotator whose
  distribution hardly moves with the document (199 of 200 news articles given the first
  label at 0.92, as measured) becomes nearly uniform instead of outvoting the others, which
  Dawid–Skene and the soft vote did not notice. With fewer than ``CALIBRATION_MIN_DOCS``
  documents an annotator is left as it is. Measured by ``benchmarks/zero_shot.py`` (300
  documents each, SmolLM2 with ``classify`` + the embedding annotator): SMS 84.3%, TREC
  coarse 50.3%, Rotten Tomatoes 62.7%, against 86.0, 27.0 and 58.7% for the LLM alone.
  An LLM annotator whose prompt a tuning chose is left as it is: the tuning already chose
  its calibration (``service.labelling.tuning``), and calibrating twice measured worse
  (the default job: SMS 90.0 against 93.7%, TREC 59.0 against 64.3%; docs/labelling.md).
- ``refined``: ``calibrated_mean``, then mixed with a logistic regression on the documents'
  embeddings (and the LLM's reading of them, where its engine gives one) fitted to the job,
  to the panel's labels without gold and to the gold labels with
  (``service.labelling.refinement``, cross-fitted; ``JobRunner.aggregate`` runs it, since it
  needs the texts). The default panel's method.

The aggregate read as much of a document as the member that read most: its ``chars_seen``
is their largest, and it is ``truncated`` only when every member was.

An abstention is "no opinion", not a class: an annotator that abstained (or failed) on a
document casts no vote there. A document nobody voted on is abstained with the reason
most of its annotators gave, or failed when every annotator failed. The aggregated
distribution then goes through the taxonomy's candidate and abstention rules
(``decide_single``), so a tie is abstained as ``ambiguous``.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np

from service.labelling.labeller import Annotation, decide_single, failed

if TYPE_CHECKING:
    import pandas as pd
from service.taxonomy import Taxonomy
from service.vocabulary import AggregationMethod, VoteMethod, values

VOTE_METHODS = values(VoteMethod)  # what ``aggregate`` computes
REFINED: AggregationMethod = "refined"  # the one method that needs more than the votes: the texts and gold labels
METHODS = values(AggregationMethod)
CALIBRATION_MIN_DOCS = 20  # below this an annotator's mean distribution says more about the sample than the prompt
DEFAULT_METHOD = "dawid_skene"  # of a job that lists its annotators
DEFAULT_PANEL_AGGREGATION = REFINED  # of the default panel (service.api.jobs): robust to a constant LLM, learns the job


SILENT = ("no vote and its prompt not scored: the default panel's LLM, whose tuned prompt followed the tuning's "
          "reference (the embedding annotator's distributions, or gold) no more than chance (the taxonomy's tuning "
          "evidence: chance_p_value)")


def silent(weight: float | None) -> bool:
    """Whether a panel member casts no vote, whatever the method: weighed 0, which only the default panel's chance
    test gives (``Panels.panel``; a request's weights are above 0). Such a member is not scored, so it has no rows
    (an LLM still reads the documents for ``refined``: ``service.labelling.refinement``)."""
    return weight == 0


def aggregate(rows: list[dict], taxonomy: Taxonomy, options: tuple[str, ...], *, method: str,
              weights: dict[str, float | None], calibrated: frozenset[str] = frozenset()) -> dict[str, Annotation]:
    """One annotation per document from its annotators' rows (doc_id, annotator, status, label, distribution...).

    ``calibrated``: the annotators (LLMs) whose distributions ``calibrated_mean`` batch-calibrates.
    """
    import pandas as pd  # here, not at the top: the CLI and the API models read METHODS without the data stack

    if method not in VOTE_METHODS:  # 'refined' needs the texts: JobRunner.aggregate refines calibrated_mean's output
        raise ValueError(f"unknown aggregation method {method!r}; choose one of {', '.join(VOTE_METHODS)}")
    frame = pd.DataFrame(rows, columns=["doc_id", "annotator", "status", "label", "distribution", "abstained",
                                        "abstain_reason", "error", "truncated", "chars_seen"])
    voting = frame[(frame["status"] == "ok") & ~frame["abstained"].astype(bool) & frame["label"].notna()]
    probs = (_probabilities(voting, options, method, weights, calibrated) if len(voting)
             else pd.DataFrame(columns=list(options)))
    out = {}
    for doc_id, group in frame.groupby("doc_id", sort=False):
        out[doc_id] = _decided(doc_id, group, probs, taxonomy, options)
        read = group[group["chars_seen"].notna()]  # a failed member read nothing and says nothing of truncation
        if len(read):
            out[doc_id].chars_seen = int(read["chars_seen"].max())
            out[doc_id].truncated = bool(read["truncated"].astype(bool).all())
    return out


def _decided(doc_id: str, group, probs, taxonomy: Taxonomy, options: tuple[str, ...]) -> Annotation:
    """One document's aggregate: the voted distribution through the taxonomy's rules, else failed or abstained."""
    if doc_id in probs.index:
        return decide_single({name: float(probs.at[doc_id, name]) for name in options}, taxonomy)
    if (group["status"] == "failed").all():
        return failed("; ".join(sorted(set(group["error"].dropna()))) or "every annotator failed")
    reasons = Counter(group["abstain_reason"].dropna())
    return Annotation(distribution={name: 0.0 for name in options}, label=None, labels=[], confidence=0.0,
                      candidates=[], abstained=True, abstain_reason=reasons.most_common(1)[0][0] if reasons else "no_votes")


def _probabilities(voting: pd.DataFrame, options: tuple[str, ...], method: str,
                   weights: dict[str, float | None], calibrated: frozenset[str]) -> pd.DataFrame:
    """Per document (index) the aggregated probability of each option (columns)."""
    import pandas as pd
    from crowdkit.aggregation import DawidSkene, MajorityVote, Wawa

    votes = voting.rename(columns={"doc_id": "task", "annotator": "worker"})[["task", "worker", "label"]]
    if method == "majority_vote":
        probs = MajorityVote().fit_predict_proba(votes)
    elif method == "dawid_skene":
        probs = DawidSkene(n_iter=100).fit_predict_proba(votes)
    else:
        matrix = np.array([[dist.get(name, 0.0)
                            for name in options] for dist in voting["distribution"]])
        estimated: Any = {}  # annotator -> skill, read with .get(): a dict, or Wawa's pandas Series (untyped)
        if method == "calibrated_mean":
            matrix = _batch_calibrated(matrix, voting["annotator"].to_numpy(), calibrated)
        elif None in weights.values():
            estimated = Wawa().fit(votes).skills_
        default = 1.0 if method == "calibrated_mean" else None
        weight = voting["annotator"].map(
            lambda a: weights.get(a) if weights.get(a) is not None else estimated.get(a, default))
        weighted = pd.DataFrame(matrix * weight.to_numpy()[:, None], columns=list(options))
        weighted["task"] = voting["doc_id"].to_numpy()
        sums = weighted.groupby("task", sort=False).sum()
        probs = sums.div(sums.sum(axis=1).replace(0, 1), axis=0)
    return probs.reindex(columns=list(options), fill_value=0.0).fillna(0.0)


def _batch_calibrated(matrix: np.ndarray, annotators: np.ndarray, calibrated: frozenset[str]) -> np.ndarray:
    """Each calibrated annotator's rows divided by its mean row over the job, renormalised (see the module doc)."""
    out = matrix.copy()
    for annotator in calibrated:
        rows = annotators == annotator
        if rows.sum() < CALIBRATION_MIN_DOCS:
            continue
        scaled = matrix[rows] / np.maximum(matrix[rows].mean(axis=0), 1e-9)
        out[rows] = scaled / np.maximum(scaled.sum(axis=1, keepdims=True), 1e-12)
    return out


def agreement(rows: list[dict], names: dict[str, str]) -> dict:
    """Pairwise agreement and Cohen's kappa, and Krippendorff's alpha (nominal), over the annotators' votes."""
    votes = {(r["doc_id"], r["annotator"]): r["label"] for r in rows
             if r["status"] == "ok" and not r["abstained"] and r["label"] is not None}
    annotators = list(names)
    docs = sorted({doc for doc, _ in votes})
    pairs = []
    for a, b in combinations(annotators, 2):
        both = [d for d in docs if (d, a) in votes and (d, b) in votes]
        left, right = [votes[d, a] for d in both], [votes[d, b] for d in both]
        pairs.append({"a": names[a], "b": names[b], "n": len(both),
                      "agreement": float(np.mean([x == y for x, y in zip(left, right)])) if both else None,
                      "kappa": _kappa(left, right)})
    return {"documents": len(docs), "pairs": pairs, "krippendorff_alpha": _alpha(votes, annotators, docs)}


def _kappa(left: list[str], right: list[str]) -> float | None:
    """Cohen's kappa, None when undefined (no overlap, or a single label everywhere)."""
    if not left or len(set(left) | set(right)) < 2:
        return None
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(left, right))


def _alpha(votes: dict, annotators: list[str], docs: list[str]) -> float | None:
    """Krippendorff's alpha over the annotator × document matrix (missing votes allowed)."""
    values = sorted(set(votes.values()))
    if len(annotators) < 2 or len(values) < 2:
        return None
    code = {label: i for i, label in enumerate(values)}
    matrix = np.full((len(annotators), len(docs)), np.nan)
    for j, doc in enumerate(docs):
        for i, annotator in enumerate(annotators):
            if (doc, annotator) in votes:
                matrix[i, j] = code[votes[doc, annotator]]
    pairable = (~np.isnan(matrix)).sum(axis=0) >= 2
    if not pairable.any():
        return None
    import krippendorff

    return float(krippendorff.alpha(reliability_data=matrix[:, pairable], level_of_measurement="nominal"))
