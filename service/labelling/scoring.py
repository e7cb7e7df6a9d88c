"""The one scorer interface: what every annotator's inputs go through to become annotations.

A ``Scorer`` takes a list of requests (``ScoreRequest`` for LLM labellers, texts for the
embedding annotator and students) and answers one result per request, each a list of
scores or the exception that request failed with. ``annotate_texts`` turns a labeller's
texts into annotations through any scorer; the adapters below build scorers from an
in-process engine, the embedding model and a student deployment (the Ray Serve model
handle's lives with the deployments, ``service.serve.app.handle_scorer``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import numpy as np

from service.engines.base import ScoreRequest
from service.errors import cause_of
from service.labelling.annotators import ClassifierLabeller, EmbeddingLabeller
from service.labelling.labeller import Annotation, Labeller, failed, in_order
from service.labelling.long_documents import combine
from service.labelling.shortlist import group_vectors, prototype_matrix, prototype_texts

Scorer = Callable[[list], Awaitable[list["list[float] | BaseException"]]]
Reading = Callable[[list[str]], "np.ndarray | None"]  # views of texts: (texts, views, width); None if it could not
PromptReading = Callable[[list[ScoreRequest]], "np.ndarray | None"]  # a model's views of prompts (``Reader``), as above
Annotator = Labeller | EmbeddingLabeller | ClassifierLabeller


def over_text(reading: np.ndarray) -> np.ndarray:
    """A reading's view over each document's tokens alone, (texts, 1, width): not its state at the prompt's answer
    (``EmbeddedEngine.read_sync`` gives the two in that order)."""
    return reading[:, :1]


def errors_per_request(call: Callable[[list], Awaitable[list]], *, remote: bool = False) -> Scorer:
    """A scorer from a call over the whole list: its failure becomes every request's error, recorded per document.

    ``remote``: the call crosses Ray, whose wrapper is unwrapped to the engine's own error (``cause_of``).
    """

    async def score(requests: list) -> list:
        try:
            return await call(requests)
        except Exception as exc:
            return [cause_of(exc) if remote else exc] * len(requests)

    return score


async def annotate_texts(labeller: Annotator, texts: list[str], scorer: Scorer) -> list[Annotation]:
    """Annotate texts (blank ones abstain unscored); a failure is retried alone once, then recorded as failed."""
    scored = [i for i, text in enumerate(texts) if text.strip()]
    annotations = [labeller.empty() for _ in texts]
    for i, annotation in zip(scored, await _score_texts(labeller, [texts[i] for i in scored], scorer)):
        annotations[i] = annotation
    return annotations


async def _score_texts(labeller: Annotator, texts: list[str], scorer: Scorer) -> list[Annotation]:
    """Annotations of non-blank texts: every request of every text in one scorer call, one solo retry of each failure.

    A shortlisting labeller's shortlists are drawn first, for the whole batch in one embedding call.
    """
    if not texts:
        return []
    shortlister = labeller.shortlister if isinstance(labeller, Labeller) else None
    shortlists: Sequence[tuple[str, ...] | None] = (
        await shortlister.propose(texts, labeller, scorer) if shortlister else [None] * len(texts))
    demonstrator = labeller.demonstrator if isinstance(labeller, Labeller) else None
    shown = await asyncio.to_thread(demonstrator.choose, texts) if demonstrator else None
    views = [_requests(labeller, text, shortlist, shown[i] if shown is not None else None)
             for i, (text, shortlist) in enumerate(zip(texts, shortlists))]
    requests = [request for per_text, _ in views for request in per_text]
    results = await scorer(requests)
    for i, result in enumerate(results):
        if isinstance(result, BaseException):
            results[i] = (await scorer([requests[i]]))[0]
    annotations, first = [], 0
    for text, (per_text, chars_seen), shortlist in zip(texts, views, shortlists):
        annotations.append(_decide(labeller, results[first: first + len(per_text)], chars_seen, len(text), shortlist))
        first += len(per_text)
    return annotations


def _requests(labeller: Annotator, text: str, shortlist: tuple[str, ...] | None,
              shown: list[tuple[str, str]] | None) -> tuple[list, int]:
    """One text's requests: an LLM labeller's through its shortlist or with its demonstrations, where it has them."""
    if isinstance(labeller, Labeller):
        if shortlist:
            return labeller.requests(text, shortlist)
        if shown is not None:
            return labeller.requests(text, shown=shown)
    return labeller.requests(text)


def _decide(labeller: Annotator, results: list, chars_seen: int, chars: int,
            shortlist: tuple[str, ...] | None = None) -> Annotation:
    """One text's annotation from its requests' results (windows combined); failed if any of them failed."""
    error = next((result for result in results if isinstance(result, BaseException)), None)
    if error is not None:
        return failed(f"{type(error).__name__}: {error}")
    try:
        combined = combine(results)
        if shortlist and isinstance(labeller, Labeller):  # only an LLM labeller shortlists
            annotation = labeller.decide(combined, shortlist)
        else:
            annotation = labeller.decide(combined)
    except (ValueError, OverflowError) as exc:
        return failed(f"malformed engine output: {exc}")
    return replace(annotation, truncated=chars_seen < chars, chars_seen=chars_seen)


def engine_scorer(engine) -> Scorer:
    """A scorer that calls an in-process engine."""
    return errors_per_request(engine.score)


def embedding_scorer(labeller: EmbeddingLabeller, embed: Callable[[list[str]], np.ndarray]) -> Scorer:
    """A job-runner scorer: similarities to the label prototypes over the temperature (computed once).

    ``embed`` is ``Embedder.embed_documents`` (short prototype texts get plain sentence vectors from it).
    """
    prototypes: list[np.ndarray] = []

    def scores(texts: list[str]) -> list[list[float]]:
        if not prototypes:
            prototypes.append(prototype_matrix(group_vectors(prototype_texts(labeller.taxonomy), embed)))
        return (embed(texts) @ prototypes[0].T / labeller.temperature).tolist()

    return errors_per_request(lambda texts: asyncio.to_thread(scores, texts))


def student_scorer(labeller: ClassifierLabeller, students) -> Scorer:
    """A job-runner scorer that asks the StudentServer deployment, columns in the labeller's option order."""
    async def predict(texts: list[str]) -> list:
        answer = await students.predict.remote(labeller.student.path, texts)
        return in_order(np.array(answer["probs"]), answer["classes"], list(labeller.options)).tolist()

    return errors_per_request(predict, remote=True)
