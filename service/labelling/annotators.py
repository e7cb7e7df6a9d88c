"""Annotators besides the LLM labeller: the embedding zero-shot annotator and a distilled student.

An annotator turns a document into an ``Annotation``. ``Labeller`` (``service.labelling.labeller``)
scores label continuations with an LLM; ``EmbeddingLabeller`` scores each label by the
cosine similarity of the document to the label's prototype, the mean all-MiniLM-L6-v2
vector (or the configured encoder's, ``service.engines.embeddings``) of "name: description"
and of each example, and takes a softmax at
``temperature`` (0.05: MiniLM's similarities between a text and rival labels differ by
a few hundredths, which this spreads over a usable probability range). Both share
``requests`` / ``decide`` / ``empty`` / ``key`` / ``spec``, so the job runner treats them alike.
The embedding annotator labels single-label taxonomies and never picks "none of these".
``ClassifierLabeller`` is a student (``service.distill.students``) served by the StudentServer
deployment; a cascade job runs it first and sends only its unsure documents to an LLM.
The embedding annotator reads a document whole, up to ``embeddings.DOCUMENT_CHARS``
(32,000 characters), as the mean of its 1,000-character chunks' vectors
(``Embedder.embed_documents``); beyond that it is flagged ``truncated``. Students read the
head of a long document (at most ``model_input_chars`` characters, flagged ``truncated``)
whatever the job's ``long_documents``: their encoder cuts the text at 128 tokens anyway
(and ``chars_seen`` counts what they are given, not what their tokeniser keeps).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from service.engines.embeddings import CHUNK_CHARS, DOCUMENT_CHARS, MODEL_ID
from service.labelling.labeller import Annotation, annotator_key, decide_single, empty, options_of, softmax
from service.labelling.shortlist import prototype_texts
from service.taxonomy import Taxonomy

EMBEDDING = "embedding"  # the model name jobs route to the process's embedder rather than a model deployment
TEMPERATURE = 0.05


class _OptionScorer:
    """What the embedding and student annotators share: the text is the request, one score per option."""

    taxonomy: Taxonomy  # fields each subclass (a dataclass) declares
    model_input_chars: int
    options: tuple[str, ...]

    @property
    def spec(self) -> dict:
        """What determines its annotations (each subclass's own)."""
        raise NotImplementedError

    @staticmethod
    def probabilities(scores: list[float]) -> list[float]:
        """The option probabilities of its scores (each subclass's own)."""
        raise NotImplementedError

    @property
    def key(self) -> str:
        """Short stable id, as for LLM labellers."""
        return annotator_key(self.spec)

    def requests(self, text: str) -> tuple[list[str], int]:
        """The text to read, cut to the input limit, and ``chars_seen``."""
        return [text[: self.model_input_chars]], min(len(text), self.model_input_chars)

    def decide(self, scores: list[float]) -> Annotation:
        """The option probabilities through the taxonomy's candidate and abstention rules."""
        if len(scores) != len(self.options):
            raise ValueError(f"expected {len(self.options)} scores, got {len(scores)}")
        return decide_single(dict(zip(self.options, self.probabilities(scores))), self.taxonomy)

    def empty(self) -> Annotation:
        """A blank document is not scored."""
        return empty(self.options)


@dataclass(frozen=True)
class EmbeddingLabeller(_OptionScorer):
    """Zero-shot annotator: similarity of the document to each label's description and examples."""

    taxonomy: Taxonomy
    taxonomy_version: str
    model_input_chars: int
    temperature: float = TEMPERATURE
    encoder: str = MODEL_ID  # the embedder's identity (``Embedder.identity``): part of the key
    model: str = EMBEDDING
    options: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if self.taxonomy.multi_label:
            raise ValueError("the embedding annotator labels single-label taxonomies only")
        object.__setattr__(self, "options", tuple(self.taxonomy.label_names()))

    @property
    def spec(self) -> dict:
        """What determines its annotations (the prototype texts are hashed in as the 'prompt')."""
        texts = "\n".join("\t".join(group) for group in prototype_texts(self.taxonomy))
        return {
            "engine": EMBEDDING, "model": self.encoder,
            "decoding": {"temperature": self.temperature, "document": f"mean of {CHUNK_CHARS}-character chunks"},
            "prompt": "label-prototypes", "prompt_hash": hashlib.sha256(texts.encode()).hexdigest()[:12],
            "taxonomy": self.taxonomy.name, "taxonomy_version": self.taxonomy_version,
            "model_input_chars": DOCUMENT_CHARS,
        }

    def requests(self, text: str) -> tuple[list[str], int]:
        """The whole text up to ``DOCUMENT_CHARS`` (chunked by the embedder), and ``chars_seen``."""
        return [text[:DOCUMENT_CHARS]], min(len(text), DOCUMENT_CHARS)

    @staticmethod
    def probabilities(scores: list[float]) -> list[float]:
        """Softmax of the similarities over the temperature."""
        return softmax(scores)


@dataclass(frozen=True)
class Student:
    """Which trained student a ``ClassifierLabeller`` asks: its id, name, kind and directory."""

    classifier_id: str
    name: str
    kind: str
    path: str


@dataclass(frozen=True)
class ClassifierLabeller(_OptionScorer):
    """A distilled student as an annotator: its class probabilities through the taxonomy's rules (cascades)."""

    taxonomy: Taxonomy
    taxonomy_version: str
    student: Student
    model_input_chars: int
    model: str = "student"
    options: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "options", options_of(self.taxonomy))

    @property
    def spec(self) -> dict:
        """The student's id and kind determine its annotations."""
        return {"engine": "student", "model": self.student.classifier_id,
                "decoding": {"kind": self.student.kind}, "prompt": None, "prompt_hash": None,
                "taxonomy": self.taxonomy.name, "taxonomy_version": self.taxonomy_version,
                "model_input_chars": self.model_input_chars}

    @staticmethod
    def probabilities(scores: list[float]) -> list[float]:
        """The student already answers probabilities (in ``options`` order)."""
        return [float(s) for s in scores]
