"""From a taxonomy and an engine's continuation scores to one document's annotation.

Single-label: every leaf label (and "none of these" when the taxonomy allows it) is a
continuation; a softmax over their log-probabilities is the distribution. The candidate
set is the smallest set of labels whose probability mass reaches ``candidate_mass``.
The document is abstained, with a reason, when "none of these" wins
(``out_of_taxonomy``), the top probability is under the threshold (``below_threshold``)
or the top two are closer than the ambiguity margin (``ambiguous``).

Multi-label: each label gets its own probability P(yes) from a yes/no continuation pair,
and every label at or above the selection threshold is chosen; no label chosen means
abstained, ``out_of_taxonomy`` when the taxonomy allows "none of these" (in multi-label
that is what choosing nothing means) and ``below_threshold`` otherwise. The ambiguity
margin applies to single-label taxonomies only.

A blank document (empty or whitespace) is not scored: abstained with ``empty_text``.
A document longer than the model's input is read as its ``long_documents`` mode says
(``service.long_documents``): one request, or one per window whose scores ``combine``
merges before ``decide``; the caller records ``truncated`` and ``chars_seen``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from .engines.base import EngineInfo, ScoreRequest
from .long_documents import MAX_WINDOWS, model_texts, reading_spec
from .prompts import PromptTemplate
from .taxonomy import NONE_LABEL, LongDocuments, Taxonomy

OUT_OF_TAXONOMY = "out_of_taxonomy"
EMPTY_TEXT = "empty_text"
BELOW_THRESHOLD = "below_threshold"
AMBIGUOUS = "ambiguous"
COMPLETION_END = "\n"  # a plain-text answer ends with its line; a chat answer ends with its turn (the engine's)


@dataclass
class Annotation:
    """One annotator's verdict on one document."""

    distribution: dict[str, float]
    label: str | None
    labels: list[str]
    confidence: float
    candidates: list[str]
    abstained: bool
    abstain_reason: str | None
    truncated: bool = False  # the model did not see all of the text
    chars_seen: int | None = None  # characters of the text that reached the model (None: not scored)
    status: str = "ok"
    error: str | None = None


@dataclass(frozen=True)
class Labeller:
    """Builds score requests for documents and turns the scores into annotations."""

    taxonomy: Taxonomy
    taxonomy_version: str
    template: PromptTemplate
    engine: EngineInfo
    model_input_chars: int
    model: str = ""  # the models-config name jobs call; not part of the key (``engine`` identifies outputs)
    long_documents: LongDocuments | None = None  # a job's override; None: the taxonomy's
    max_windows: int = MAX_WINDOWS
    system: str = field(init=False)
    options: tuple[str, ...] = field(init=False)
    continuations: tuple[str, ...] = field(init=False)  # rendered once: the same after every document

    def __post_init__(self):
        allow_none = self.taxonomy.abstention.allow_none and not self.taxonomy.multi_label
        system = self.template.render(
            "system",
            instruction=self.taxonomy.instruction,
            labels=self.taxonomy.leaves(),
            allow_none=allow_none,
            none_label=NONE_LABEL,
            multi_label=self.taxonomy.multi_label,
            demonstrations=demonstrations(self.taxonomy),
        )
        object.__setattr__(self, "system", system)
        object.__setattr__(self, "long_documents", self.long_documents or self.taxonomy.long_documents)
        object.__setattr__(self, "options", options_of(self.taxonomy))
        answer, end = self.template.render("assistant"), "" if self.template.chat else COMPLETION_END
        object.__setattr__(self, "continuations", tuple(answer + c + end for c in self._render_continuations()))

    @property
    def spec(self) -> dict:
        """Everything that determines an annotation: recorded on the job and hashed into the cache key."""
        return {
            "engine": self.engine.engine,
            "model": self.engine.model,
            "decoding": self.engine.decoding,
            "prompt": self.template.name,
            "prompt_hash": self.template.hash,
            "taxonomy": self.taxonomy.name,
            "taxonomy_version": self.taxonomy_version,
            "model_input_chars": self.model_input_chars,
            **reading_spec(self.long_documents, self.max_windows),
        }

    @property
    def key(self) -> str:
        """Short stable id of this annotator (the cache key's second half, next to the text hash)."""
        return annotator_key(self.spec)

    def requests(self, text: str) -> tuple[list[ScoreRequest], int]:
        """The engine requests for one document (one per window in ``chunk`` mode), and ``chars_seen``."""
        texts, chars_seen = model_texts(text, self.long_documents, self.model_input_chars,
                                        max_windows=self.max_windows)
        return [ScoreRequest(self.system, self.template.render("user", text=piece, options=self.options),
                             self.continuations, self.template.chat) for piece in texts], chars_seen

    def _render_continuations(self) -> list[str]:
        """The texts scored after the prompt, in the order ``decide`` reads them."""
        if self.taxonomy.multi_label:
            return [self.template.render(side, label=name) for name in self.options for side in ("yes", "no")]
        return [self.template.render("choice", label=name) for name in self.options]

    def decide(self, scores: list[float]) -> Annotation:
        """Turn continuation log-probabilities into distribution, candidates and abstention."""
        if len(scores) != len(self.continuations):
            raise ValueError(f"expected {len(self.continuations)} scores, got {len(scores)}")
        if self.taxonomy.multi_label:
            return self._decide_multi(scores)
        return self._decide_single(scores)

    def _decide_single(self, scores: list[float]) -> Annotation:
        """Softmax over options, then candidates and abstention rules."""
        return decide_single(dict(zip(self.options, softmax(scores))), self.taxonomy)

    def _decide_multi(self, scores: list[float]) -> Annotation:
        """Independent P(yes) per label; choose all at or above the threshold."""
        distribution = {
            name: 1.0 / (1.0 + math.exp(scores[2 * i + 1] - scores[2 * i])) for i, name in enumerate(self.options)
        }
        ranked = sorted(distribution.items(), key=lambda kv: -kv[1])
        chosen = [name for name, p in ranked if p >= self.taxonomy.selection_threshold]
        none_reason = OUT_OF_TAXONOMY if self.taxonomy.abstention.allow_none else BELOW_THRESHOLD
        return Annotation(
            distribution=distribution, label=chosen[0] if chosen else None, labels=chosen,
            confidence=ranked[0][1], candidates=chosen, abstained=not chosen,
            abstain_reason=None if chosen else none_reason,
        )

    def empty(self) -> Annotation:
        """A blank document is not sent to the model."""
        return empty(self.options)


def demonstrations(taxonomy: Taxonomy) -> list[tuple[str, str]]:
    """(label, example) pairs from the taxonomy's examples, one label after another, so no label comes in a block."""
    leaves = taxonomy.leaves()
    rounds = max((len(label.examples) for label in leaves), default=0)
    return [(label.name, label.examples[i]) for i in range(rounds) for label in leaves if i < len(label.examples)]


def options_of(taxonomy: Taxonomy) -> tuple[str, ...]:
    """What a single-label distribution ranges over: the leaf labels, and "none of these" when allowed."""
    allow_none = taxonomy.abstention.allow_none and not taxonomy.multi_label
    return tuple(taxonomy.label_names()) + ((NONE_LABEL,) if allow_none else ())


def annotator_key(spec: dict) -> str:
    """Short stable id of an annotator spec (the cache key's second half, next to the text hash)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def decide_single(distribution: dict[str, float], taxonomy: Taxonomy) -> Annotation:
    """Label, candidate set and abstention of a single-label distribution (any annotator, or an aggregate)."""
    ranked = sorted(distribution.items(), key=lambda kv: -kv[1])
    top, confidence = ranked[0]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
    candidates = _candidate_set([kv for kv in ranked if kv[0] != NONE_LABEL], taxonomy.candidate_mass)
    reason = None
    if top == NONE_LABEL:
        reason = OUT_OF_TAXONOMY
    elif confidence < taxonomy.selection_threshold:
        reason = BELOW_THRESHOLD
    elif confidence - runner_up < taxonomy.abstention.ambiguity_margin:
        reason = AMBIGUOUS
    label = None if reason else top
    return Annotation(
        distribution=distribution, label=label, labels=[label] if label else [], confidence=confidence,
        candidates=candidates, abstained=reason is not None, abstain_reason=reason,
    )


def empty(options: tuple[str, ...]) -> Annotation:
    """A blank document is not scored: abstained, with every option at probability 0."""
    return Annotation(
        distribution={name: 0.0 for name in options}, label=None, labels=[], confidence=0.0,
        candidates=[], abstained=True, abstain_reason=EMPTY_TEXT,
    )


def failed(error: str) -> Annotation:
    """The record of a document the engine could not label."""
    return Annotation(
        distribution={}, label=None, labels=[], confidence=0.0, candidates=[], abstained=False,
        abstain_reason=None, status="failed", error=error,
    )


def softmax(scores: list[float]) -> list[float]:
    """Numerically stable softmax of log-probabilities."""
    peak = max(scores)
    exps = [math.exp(s - peak) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def _candidate_set(ranked: list[tuple[str, float]], mass: float) -> list[str]:
    """Smallest prefix of the ranked labels whose probability reaches ``mass`` (of the labels' own mass)."""
    total = sum(p for _, p in ranked)
    chosen, reached = [], 0.0
    for name, p in ranked:
        chosen.append(name)
        reached += p
        if reached >= mass * total - 1e-12:
            break
    return chosen
