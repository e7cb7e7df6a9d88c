"""Shortlists for large taxonomies: per document, the K leaves worth scoring, with a recall one can state.

Scoring every leaf costs a continuation per leaf and a system prompt that lists them all;
500 leaves do not fit the embedded model's context. A shortlisting labeller scores only
the K leaves a retriever proposes for the document; the rest get probability 0.

The retriever is the embedding annotator's: the cosine similarity (the runner's encoder) of the
document to each leaf's prototype, the mean vector of "name: description" and its
examples. Where texts labelled by people exist for the taxonomy (gold labels of its earlier
jobs), a leaf's score is raised to the similarity of its nearest labelled text, so leaves
the descriptions miss are found through their examples in use.

Strategy ``retrieve`` (the default) is described above; ``top_down`` (taxonomies with
parents, ``TopDown``) lets the LLM choose among the top-level labels first, keeps their
candidate set (``candidate_mass`` of the probability), and goes down to the children of the
chosen labels, level by level, until the shortlist is leaves: one scoring round per level.

K is fixed (``shortlist: {k: 10}``) or ``auto``: the smallest K whose recall on a
calibration set reaches ``recall`` (0.98 by default), at most ``max_k`` (10: each shortlisted
label costs its tokens in every document's prompt; where the target needs
more, the recall reached at ``max_k`` is what is recorded). The calibration set is the labelled
texts (each scored with itself left out of the neighbours) or, without any, the taxonomy's
examples (each scored against prototypes built without it); with neither, ``DEFAULT_K``.
The recall at the chosen K is recorded with its 95% interval and the size of the set; the
quality report measures the recall again on the job's own gold sample.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.engines.embeddings import MODEL_ID, encoder_key
from service.errors import InvalidInput
from service.taxonomy import Taxonomy

RETRIEVE, TOP_DOWN = "retrieve", "top_down"  # the strategies
DEFAULT_K = 10  # ``auto`` with nothing to calibrate on
MIN_K = 2
MAX_NEIGHBOURS = 5000  # labelled texts kept for the nearest-neighbour part (the most recent)

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class Calibration:
    """How K was chosen: the recall reached on ``n`` calibration texts (with its 95% Wilson interval)."""

    k: int
    source: str  # "fixed", "gold", "examples" or "none"
    n: int = 0
    recall: float | None = None
    interval: tuple[float, float] | None = None


class Shortlister:
    """Proposes, for each document, the K leaves of a taxonomy most similar to it (in taxonomy order)."""

    def __init__(self, taxonomy: Taxonomy, embed: Embed, *, k: int | str, recall: float, max_k: int = 10,
                 labelled: Sequence[tuple[str, str]] = (), encoder: str = MODEL_ID):
        self.names = tuple(taxonomy.label_names())
        self._embed = embed
        groups = prototype_texts(taxonomy)
        self._group_vectors = group_vectors(groups, embed)
        self._prototypes = prototype_matrix(self._group_vectors)
        index = {name: i for i, name in enumerate(self.names)}
        labelled = [(text, label) for text, label in labelled if label in index][-MAX_NEIGHBOURS:]
        self._neighbours = embed([text for text, _ in labelled]) if labelled else np.zeros((0, 1), np.float32)
        self._neighbour_labels = np.array([index[label] for _, label in labelled], dtype=np.int64)
        self.calibration = self._calibrate(k, recall, min(max_k, len(self.names)))
        # the annotator key's part: not the labelled texts, nor the K calibrated on them, which may grow between a
        # job's submission and its run (each annotation records its own shortlist instead)
        self.plan = {"strategy": RETRIEVE, "k": k, "recall": recall, "max_k": max_k,
                     "prototypes": hashlib.sha256("\n".join("\t".join(g) for g in groups).encode()).hexdigest()[:12],
                     **encoder_key(encoder)}  # encoder: Embedder.identity of ``embed``

    @property
    def k(self) -> int:
        """How many leaves each document's shortlist holds."""
        return self.calibration.k

    async def propose(self, texts: list[str], labeller, scorer) -> list[tuple[str, ...]]:
        """The shortlists of a batch of texts (off the event loop: embedding is CPU work)."""
        return await asyncio.to_thread(self.shortlists, texts)

    def shortlists(self, texts: list[str]) -> list[tuple[str, ...]]:
        """Each text's K best leaves, in taxonomy order (so equal shortlists make equal prompts)."""
        scores = self._scores(self._embed(texts))
        top = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        return [tuple(self.names[i] for i in sorted(row)) for row in top]

    def _scores(self, vectors: np.ndarray, *, skip: np.ndarray | None = None) -> np.ndarray:
        """Similarity of each vector to each leaf: its prototype, raised to its nearest labelled text."""
        scores = vectors @ self._prototypes.T
        if len(self._neighbour_labels):
            near = vectors @ self._neighbours.T
            if skip is not None:
                near[np.arange(len(vectors)), skip] = -np.inf  # a calibration text is not its own neighbour
            for leaf in np.unique(self._neighbour_labels):
                scores[:, leaf] = np.maximum(scores[:, leaf], near[:, self._neighbour_labels == leaf].max(axis=1))
        return scores

    def _calibrate(self, k: int | str, recall: float, max_k: int) -> Calibration:
        """The fixed K, or the smallest K up to ``max_k`` reaching ``recall`` on the labelled texts or the examples."""
        if k != "auto":
            return Calibration(min(int(k), len(self.names)), "fixed")
        if len(self._neighbour_labels):
            scores = self._scores(self._neighbours, skip=np.arange(len(self._neighbour_labels)))
            truth, source = self._neighbour_labels, "gold"
        else:
            scores, truth = self._held_out_examples()
            source = "examples"
        if not len(truth):
            return Calibration(min(DEFAULT_K, max_k), "none")
        ranks = (scores > scores[np.arange(len(truth)), truth][:, None]).sum(axis=1)  # 0: the true leaf is first
        chosen = next((k for k in range(MIN_K, max_k + 1) if np.mean(ranks < k) >= recall), max_k)
        hits = int(np.sum(ranks < chosen))
        return Calibration(chosen, source, len(truth), hits / len(truth), wilson(hits, len(truth)))

    def _held_out_examples(self) -> tuple[np.ndarray, np.ndarray]:
        """Scores of each taxonomy example against prototypes built without it, and its leaf."""
        rows, truth = [], []
        for leaf, vectors in enumerate(self._group_vectors):
            for j in range(1, len(vectors)):
                prototypes = self._prototypes.copy()
                prototypes[leaf] = _unit(np.delete(vectors, j, axis=0).mean(axis=0, keepdims=True))[0]
                rows.append(vectors[j] @ prototypes.T)
                truth.append(leaf)
        if not rows:
            return np.zeros((0, len(self.names))), np.array([], dtype=np.int64)
        return np.array(rows), np.array(truth, dtype=np.int64)


def prototype_texts(taxonomy: Taxonomy) -> list[list[str]]:
    """Per leaf, the texts whose mean embedding stands for it: "name: description" and its examples."""
    return [[f"{label.name}: {label.description}", *label.examples] for label in taxonomy.leaves()]


def prototype_matrix(groups: list[np.ndarray]) -> np.ndarray:
    """One unit-length row per label: the mean of its group's embeddings."""
    return _unit(np.stack([vectors.mean(axis=0) for vectors in groups]))


def group_vectors(groups: list[list[str]], embed: Embed) -> list[np.ndarray]:
    """Each group's embeddings, all texts sent to the embedder in one call."""
    flat = embed([text for group in groups for text in group])
    bounds = np.cumsum([0, *map(len, groups)])
    return [flat[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def _unit(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


class TopDown:
    """Shortlists chosen by the LLM itself, one level of the hierarchy at a time (the ``top_down`` strategy)."""

    def __init__(self, taxonomy: Taxonomy):
        self.children: dict[str | None, list[str]] = {}
        for label in taxonomy.labels:
            self.children.setdefault(label.parent, []).append(label.name)
        if len(self.children) < 2:
            raise InvalidInput(f"taxonomy {taxonomy.name!r} has no parent labels; shortlist strategy 'top_down' needs "
                               "a hierarchy (use strategy 'retrieve')")
        self.order = {label.name: i for i, label in enumerate(taxonomy.labels)}
        self.plan = {"strategy": TOP_DOWN}
        self.calibration = None

    async def propose(self, texts: list[str], labeller, scorer) -> list[tuple[str, ...]]:
        """Each text's leaves under the labels the LLM placed it in, level by level from the top.

        At each level the text (its head, as the retriever reads it) is scored on the labels
        still open, and the labeller's candidate set of them (``candidate_mass``) opens their children.
        """
        nodes = [tuple(self.children[None])] * len(texts)
        while True:
            todo = [i for i, level in enumerate(nodes) if any(name in self.children for name in level)]
            if not todo:
                return nodes
            results = await scorer([labeller.requests(texts[i], nodes[i])[0][0] for i in todo])
            for i, result in zip(todo, results):
                if isinstance(result, BaseException):
                    raise result
                chosen = labeller.candidates_among(nodes[i], result)
                below = {child for name in chosen for child in self.children.get(name, [name])}
                nodes[i] = tuple(sorted(below, key=self.order.__getitem__))
