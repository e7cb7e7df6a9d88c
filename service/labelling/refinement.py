"""Refining a panel's labels with a logistic regression fitted to the job's own documents.

The panel (the LLM and the embedding annotator, ``calibrated_mean``) labels each document
alone. Its labels, taken together, say more: documents that lie close in embedding space
tend to share a label, which a classifier trained on the whole job can use and a
per-document vote cannot. ``refine`` fits a class-balanced logistic regression (C = 1) on
the documents' vectors (``Embedder.embed_documents`` of the runner's encoder, MiniLM by default: a long
text is read whole), beside the job's LLM's own reading of each text in the job's prompt where its
engine can give one (``with_reading``; the embedded SmolLM2's hidden states over the document and
at the prompt's last token, where it answers):

- **Without gold labels** (fewer than ``MIN_GOLD``, or one class) it learns the panel's own
  top labels, cross-fitted over ``FOLDS`` folds so no document's refined label comes from
  a model that was told that document's label, and counts half beside the panel
  (self-training, as in Gera et al. 2022, "Zero-Shot Text Classification with
  Self-Training").
- **With gold labels** it learns the people's labels, from the same features *and* the panel's
  log-probabilities (stacking): the coefficients on the log-probabilities are a per-label
  bias and scaling of the panel (matrix scaling, Guo et al. 2017, which contains the
  per-label bias and temperature calibrator), so one fit both calibrates the panel and
  adds what the embeddings know. It learns them as a correction to the labels the job had
  without gold (the label-free refinement's log-probabilities are the regression's offset,
  ``_Correction``), so its penalty pulls toward those labels rather than toward a uniform
  guess: fitted from scratch, 25 gold labels over TREC's 6 classes had lowered the default
  job below its zero-label accuracy (58.7 against 64.3%); as a correction they lift it
  (67.1%), and every gold count of the learning curve gained on TREC, Rotten Tomatoes and
  the speeches (SMS: within a point, below; docs/benchmarks.md). Each
  gold document's distribution comes from the model fitted on the other folds (the same
  text twice stays in one fold); the other documents get the mean of the fold models, so
  every label comes from the same kind of model. No gold label is used in any
  other way (nothing is chosen by gold accuracy), so the statistics that compare labels
  with gold (the report, DSL, conformal calibration) stay valid: the cross-fitted
  residuals stand for the others' (Zrnic & Candès 2024, "Cross-prediction-powered
  inference"; ``tests/test_refinement.py`` checks DSL's coverage).

Measured by ``benchmarks/zero_shot.py`` (docs/benchmarks.md). Pure arrays in and out;
``JobRunner.aggregate`` reads the job, embeds and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from service.labelling.labeller import Annotation, decide_single
from service.labelling.scoring import Reading
from service.taxonomy import Taxonomy

FOLDS = 5
MIN_GOLD = 10  # fewer gold labels cannot train a regression worth a fold split; the label-free refinement runs
MIN_DOCUMENTS = 2 * FOLDS  # below this a cross-fitted self-training has folds too small to learn from
SELF_TRAINING_WEIGHT = 0.5  # the regression's share without gold (the panel keeps the other half)


@dataclass(frozen=True)
class Refinement:
    """What ran, for the job's record and the quality report."""

    trained_on: str  # "panel labels", "gold labels" or "nothing" (too few documents or classes)
    gold_labels: int = 0  # gold labels that trained it
    gold_accuracy: dict[str, float] | None = None  # on the gold documents: panel, label_free, refined (cross-fitted)
    read_by_llm: bool = False  # whether the regression also saw the LLM's reading of the texts (``with_reading``)
    validity: str = (f"cross-fitted ({FOLDS} folds): no document's label comes from a model fitted on its own label, "
                     "so gold statistics (report, DSL, conformal) stay valid")

    def as_dict(self) -> dict:
        """JSON for the job's annotator_spec."""
        return asdict(self)


def refine(probs: np.ndarray, features: np.ndarray, gold_index: np.ndarray, *, groups: np.ndarray | None = None,
           seed: int = 0) -> tuple[np.ndarray, Refinement]:
    """Refined distributions (``probs`` with a regression on ``features``) and what ran.

    ``gold_index``: each document's gold label as a column of ``probs``, −1 where it has none.
    ``groups``: documents that must share a fold (the same text twice), else each its own.
    """
    n, k = probs.shape
    groups = np.arange(n) if groups is None else groups
    gold = np.flatnonzero(gold_index >= 0)
    if n >= MIN_DOCUMENTS and len(gold) >= MIN_GOLD and len(set(gold_index[gold].tolist())) >= 2:
        label_free, _ = refine(probs, features, np.full(n, -1), groups=groups, seed=seed)
        offset = np.log(np.maximum(label_free, 1e-9))
        stacked = _stacked(probs, features)
        others = np.setdiff1d(np.arange(n), gold)
        fitted = np.zeros((n, k))
        fitted[gold], fitted[others] = _cross_fitted(stacked[gold], gold_index[gold], groups[gold], k, seed,
                                                     stacked[others], (offset[gold], offset[others]))
        accuracy = {name: round(float(np.mean(p[gold].argmax(axis=1) == gold_index[gold])), 4)
                    for name, p in (("panel", probs), ("label_free", label_free), ("refined", fitted))}
        return fitted, Refinement("gold labels", len(gold), accuracy)
    panel_labels = probs.argmax(axis=1)
    if n < MIN_DOCUMENTS or len(set(panel_labels.tolist())) < 2:
        return probs, Refinement("nothing")
    self_trained, _ = _cross_fitted(features, panel_labels, groups, k, seed, features[:0])
    return SELF_TRAINING_WEIGHT * self_trained + (1 - SELF_TRAINING_WEIGHT) * probs, Refinement("panel labels")


def with_reading(vectors: np.ndarray, reading: np.ndarray) -> np.ndarray:
    """The encoder's vectors beside each view of the LLM's reading of the same texts, every block of equal length.

    ``reading``: (texts, views, width), ``EmbeddedEngine.read_sync``'s two views of each
    document in the job's prompt (over its tokens; at the prompt's last token), or the first
    alone for an LLM without a vote (``Panels.reader``). Each view is
    standardised per dimension over the job's own documents (no labels): a model's hidden
    states have a few dimensions far larger than the rest, which would otherwise be all a
    regression sees. Equal lengths are not equal spread: centred, a view varies more across
    documents than the encoder's unit vectors, which share a common direction. Measured on
    the same seeded samples (docs/labelling.md): equal blocks were at or above the reading's two
    views sharing one block's length on every sample but the speeches without gold (74.6 against 75.1%, both with
    the silenced LLM's answer state, which is now left out).
    """
    reading = np.asarray(reading, dtype=np.float64)  # kept as float32 (service.work.kept_vectors): exact, then widened
    spread = reading.std(axis=0)
    standard = (reading - reading.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    standard /= np.maximum(np.linalg.norm(standard, axis=2, keepdims=True), 1e-12)
    blocks = [vectors, *standard.transpose(1, 0, 2)]
    return np.hstack(blocks) / np.sqrt(len(blocks))


def _stacked(probs: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The embeddings beside the panel's log-probabilities, the two blocks scaled to equal total variance.

    The regression's penalty is in units of the features: unscaled, a log-probability
    (range about −7..0) beside unit-length vectors of hundreds of dimensions (entries about ±0.05)
    would be nearly unpenalised and win by units alone. The scale comes from the job's own
    documents, no labels. Measured (8 gold draws each, 25/50/100 labels): within 2.5 points of
    the best fixed scale tried (0.1, 0.3, 1) on SMS, Rotten Tomatoes and TREC. A panel that says the same
    everywhere carries nothing per document: its block is zero (scaled up, its constant would be a column of
    millions that leaves the solver stuck).
    """
    logp = np.log(np.maximum(probs, 1e-9))
    spread = float(logp.var(axis=0).sum())
    scale = np.sqrt(features.var(axis=0).sum() / spread) if spread > 1e-12 else 0.0
    return np.hstack([features, scale * logp])


def _cross_fitted(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int, seed: int,
                  others: np.ndarray, offsets: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distribution from a regression fitted on the other folds (a group stays in one fold), and the
    mean of the fold models' distributions for ``others``: every prediction comes from the same kind of model,
    fitted on four fifths of the labels, as cross-prediction prescribes. With ``offsets`` (log-probabilities of
    the rows and of ``others``) the regression learns a correction to them (``_Correction``)."""
    out, elsewhere = np.zeros((len(features), k)), np.zeros((len(others), k))
    names = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    for part in np.array_split(names[order], FOLDS):
        held = np.isin(groups, part)
        if offsets is None:
            model = _Model(features[~held], labels[~held], k)
            out[held] = model.predict(features[held])
            elsewhere += model.predict(others) / FOLDS
        else:
            rows, beyond = offsets
            correction = _Correction(features[~held], rows[~held], labels[~held], k)
            out[held] = correction.predict(features[held], rows[held])
            elsewhere += correction.predict(others, beyond) / FOLDS
    return out, elsewhere


class _Model:
    """A class-balanced logistic regression with distributions over all ``k`` columns.

    A fold that holds one class predicts it with certainty (no regression can be fitted).
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, k: int):
        from sklearn.linear_model import LogisticRegression

        self.k, self.classes = k, np.unique(labels)
        self.model = None if len(self.classes) < 2 else LogisticRegression(
            C=1.0, class_weight="balanced", max_iter=2000).fit(features, labels)

    def predict(self, queries: np.ndarray) -> np.ndarray:
        """Distributions for ``queries``."""
        out = np.zeros((len(queries), self.k))
        if self.model is None:
            out[:, self.classes] = 1.0 / max(len(self.classes), 1)
            return out
        if len(queries):
            out[:, self.model.classes_] = self.model.predict_proba(queries)
        return out


class _Correction:
    """A class-balanced multinomial logistic regression on top of an offset: P(y | x) ∝ exp(offset + x·W + b).

    Its L2 penalty (C = 1, the intercept included) pulls toward the offset, not toward a uniform
    guess: fitted to a few gold labels it keeps the label-free labels where the labels say
    little, and moves them as far as the labels show.
    """

    def __init__(self, features: np.ndarray, offset: np.ndarray, labels: np.ndarray, k: int, c: float = 1.0):
        from scipy.optimize import minimize
        from scipy.special import log_softmax
        from sklearn.utils.class_weight import compute_sample_weight

        d = features.shape[1]
        weight = compute_sample_weight("balanced", labels)
        target = np.eye(k)[labels]

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            coef, intercept = theta[:d * k].reshape(d, k), theta[d * k:]
            log_probs = log_softmax(offset + features @ coef + intercept, axis=1)
            residual = (np.exp(log_probs) - target) * weight[:, None]
            value = -float(weight @ log_probs[np.arange(len(labels)), labels]) + float(theta @ theta) / (2 * c)
            return value, np.concatenate([(features.T @ residual).ravel(), residual.sum(axis=0)]) + theta / c

        theta = minimize(loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": 1000}).x
        self.coef, self.intercept = theta[:d * k].reshape(d, k), theta[d * k:]

    def predict(self, queries: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Distributions for ``queries`` with their offsets."""
        from scipy.special import softmax

        return softmax(offset + queries @ self.coef + self.intercept, axis=1)


def refined_annotations(decided: dict[str, Annotation], documents: list[dict], taxonomy: Taxonomy,
                        embed: Callable[[list[str]], np.ndarray],
                        read: Reading | None = None) -> tuple[dict[str, Annotation], Refinement]:
    """A job's aggregated annotations refined (``documents``: doc_id, text, gold_label, in job order).

    ``read``: the job's LLM's reading of texts in its prompt (``Panels.reader``), the regression's other views beside
    ``embed``'s vectors (``with_reading``); without it, or when it gives None, the vectors alone.
    Only documents the panel voted on are refined and train anything; failed and unvoted ones stay as they are.
    """
    options = tuple(taxonomy.label_names())
    voted = [d for d in documents if d["doc_id"] in decided and decided[d["doc_id"]].status == "ok"
             and sum(decided[d["doc_id"]].distribution.values()) > 0]  # a cancelled job's unlabelled ones are not
    if not voted:
        return decided, Refinement("nothing")
    probs = np.array([[decided[d["doc_id"]].distribution.get(o, 0.0) for o in options] for d in voted])
    position = {name: k for k, name in enumerate(options)}
    gold_index = np.array([position.get(d["gold_label"], -1) for d in voted])
    texts = [d["text"] for d in voted]
    groups = np.unique(texts, return_inverse=True)[1]  # the same text twice shares a fold: no twin teaches it
    features, reading = embed(texts), read(texts) if read is not None else None
    if reading is not None:
        features = with_reading(features, reading)
    refined, refinement = refine(probs, features, gold_index, groups=groups)
    refinement = replace(refinement, read_by_llm=reading is not None and refinement.trained_on != "nothing")
    out = dict(decided)
    for d, row in zip(voted, refined):
        before = decided[d["doc_id"]]
        out[d["doc_id"]] = replace(decide_single(dict(zip(options, map(float, row))), taxonomy),
                                   truncated=before.truncated, chars_seen=before.chars_seen)
    return out, refinement
