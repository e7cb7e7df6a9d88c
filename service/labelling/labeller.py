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

Shortlisted (a taxonomy's or job's ``shortlist``, ``service.labelling.shortlist``): each document is
scored on its own shortlist of leaves only, the other leaves get probability 0; which
prompt it is scored with is ``shortlist_prompting``'s choice. Past ``max_scored_labels``
the whole-taxonomy prompt is never built, and a distribution flat over the shortlist (top
probability under ``FLAT_FACTOR`` / K) is abstained as ``flat_shortlist`` rather than forced.

A blank document (empty or whitespace) is not scored: abstained with ``empty_text``.
A document longer than the model's input is read as its ``long_documents`` mode says
(``service.labelling.long_documents``): one request, or one per window whose scores ``combine``
merges before ``decide``; the caller records ``truncated`` and ``chars_seen``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace

import numpy as np

from service.engines.base import EngineInfo, ScoreRequest
from service.labelling.demonstrations import Demonstrator
from service.labelling.long_documents import MAX_WINDOWS, model_texts, reading_spec
from service.labelling.prompts import PromptTemplate
from service.labelling.shortlist import Shortlister, TopDown
from service.taxonomy import NONE_LABEL, Taxonomy
from service.vocabulary import LongDocuments

OUT_OF_TAXONOMY = "out_of_taxonomy"
EMPTY_TEXT = "empty_text"
BELOW_THRESHOLD = "below_threshold"
AMBIGUOUS = "ambiguous"
FLAT_SHORTLIST = "flat_shortlist"
SHORTLIST_PROMPTS = 256
FLAT_FACTOR = 1.5  # a shortlist's top probability under 1.5 / K is too close to uniform to be a choice
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
    shortlist: list[str] | None = None  # the leaves that were scored, when the labeller shortlists


INFORMATIVE = "informative"  # the key of ``TunedPrompt.informative`` in a stored tuning's evidence


@dataclass(frozen=True)
class TunedPrompt:
    """What a prompt tuning chose (``service.labelling.tuning``): a template and its calibration, with the prior it needs."""

    prompt: str
    calibration: str = "none"  # "none" or "contextual"
    prior: tuple[float, ...] | None = None  # contextual: each option's log-probability on content-free text
    informative: bool = True  # its scores follow the tuning's reference beyond chance (a panel weighs it 0 if not)


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
    shortlister: Shortlister | TopDown | None = None  # scores each document's shortlist only (large taxonomies)
    whole_prompt: bool = False  # shortlisted: the system prompt still describes every leaf (see shortlist_prompting)
    tuning: TunedPrompt | None = None  # what tuning chose (its prior applied); None: not a tuned prompt
    demonstrator: Demonstrator | None = None  # chooses each document's demonstrations (taxonomy 'demonstrations')
    system: str = field(init=False)
    options: tuple[str, ...] = field(init=False)
    continuations: tuple[str, ...] = field(init=False)  # rendered once: the same after every document
    _shortlist_prompts: dict[tuple[str, ...], str] = field(init=False, repr=False, compare=False)  # while it recurs

    def __post_init__(self):
        object.__setattr__(self, "long_documents", self.long_documents or self.taxonomy.long_documents)
        object.__setattr__(self, "options", options_of(self.taxonomy))
        whole = self.shortlister is None or self.whole_prompt  # otherwise the whole-taxonomy prompt is never built
        object.__setattr__(self, "system", self._system(tuple(self.taxonomy.label_names())) if whole else "")
        object.__setattr__(self, "continuations", self._continuations(self.options) if self.shortlister is None else ())
        object.__setattr__(self, "_shortlist_prompts", {})  # shortlist -> its system prompt

    def _system(self, names: tuple[str, ...], shown: list[tuple[str, str]] | None = None) -> str:
        """The system prompt listing the labels ``names`` (every leaf, a document's shortlist, or one level of it).

        ``shown``: a document's own demonstrations (label, text), instead of the taxonomy's examples.
        """
        allow_none = self.taxonomy.abstention.allow_none and not self.taxonomy.multi_label
        chosen = set(names)
        return self.template.render(
            "system",
            instruction=self.taxonomy.instruction,
            labels=[label for label in self.taxonomy.labels if label.name in chosen],
            allow_none=allow_none,
            none_label=NONE_LABEL,
            multi_label=self.taxonomy.multi_label,
            demonstrations=shown if shown is not None else [d for d in demonstrations(self.taxonomy) if d[0] in chosen],
        )

    def _continuations(self, options: tuple[str, ...]) -> tuple[str, ...]:
        """The texts scored after the prompt for ``options``, in the order ``decide`` reads them."""
        answer, end = self.template.render("assistant"), "" if self.template.chat else COMPLETION_END
        if self.taxonomy.multi_label:
            rendered = [self.template.render(side, label=name) for name in options for side in ("yes", "no")]
        else:
            rendered = [self.template.render("choice", label=name) for name in options]
        return tuple(answer + c + end for c in rendered)

    def _shortlist_prompt(self, shortlist: tuple[str, ...]) -> str:
        """A shortlist's system prompt, rendered once while it recurs (the last ``SHORTLIST_PROMPTS`` kept)."""
        if self.whole_prompt:
            return self.system
        prompts = self._shortlist_prompts
        if shortlist not in prompts:
            if len(prompts) >= SHORTLIST_PROMPTS:
                prompts.pop(next(iter(prompts)))
            prompts[shortlist] = self._system(shortlist)
        return prompts[shortlist]

    def shortlist_options(self, shortlist: tuple[str, ...]) -> tuple[str, ...]:
        """The options a shortlisted document is scored on: its leaves, and "none of these" when allowed."""
        return shortlist + tuple(o for o in self.options if o == NONE_LABEL)

    @property
    def spec(self) -> dict:
        """Everything that determines an annotation: recorded on the job and hashed into the cache key."""
        shortlist = {} if self.shortlister is None else {
            "shortlist": {**self.shortlister.plan, "whole_prompt": self.whole_prompt}}
        return {
            "engine": self.engine.engine,
            "model": self.engine.model,
            "decoding": self.engine.decoding,
            "prompt": self.template.name,
            "prompt_hash": self.template.hash,
            "taxonomy": self.taxonomy.name,
            "taxonomy_version": self.taxonomy_version,
            "model_input_chars": self.model_input_chars,
            **reading_spec(self.reading, self.max_windows),
            **shortlist,
            **({} if self.tuning is None else {"tuning": {
                "calibration": self.tuning.calibration,
                "prior": None if self.tuning.prior is None else [round(p, 6) for p in self.tuning.prior]}}),
            **({} if self.demonstrator is None else {"demonstrations": self.demonstrator.spec}),
        }

    @property
    def reading(self) -> LongDocuments:
        """How it reads long texts: the job's override, else the taxonomy's (as ``__post_init__`` resolved it)."""
        return self.long_documents or self.taxonomy.long_documents

    @property
    def key(self) -> str:
        """Short stable id of this annotator (the cache key's second half, next to the text hash)."""
        return annotator_key(self.spec)

    def reading_request(self, text: str) -> ScoreRequest:
        """The prompt a model reads a document in for the refinement (``Reader``): its first window as scored, without
        the continuations (nothing is scored), so a reading travels light."""
        return replace(self.requests(text)[0][0], continuations=())

    def requests(self, text: str, shortlist: tuple[str, ...] | None = None,
                 shown: list[tuple[str, str]] | None = None) -> tuple[list[ScoreRequest], int]:
        """The engine requests for one document (one per window in ``chunk`` mode), and ``chars_seen``.

        With a ``shortlist`` (from ``shortlister``) only its leaves are in the prompt and scored;
        with ``shown`` (from ``demonstrator``) the system prompt carries those demonstrations.
        """
        texts, chars_seen = model_texts(text, self.reading, self.model_input_chars,
                                        max_windows=self.max_windows)
        if shown is not None:
            system = self._system(tuple(self.taxonomy.label_names()), shown)
            options, continuations = self.options, self.continuations
        elif shortlist is None:
            system, options, continuations = self.system, self.options, self.continuations
        else:
            options = self.shortlist_options(shortlist)
            system, continuations = self._shortlist_prompt(shortlist), self._continuations(options)
        return [ScoreRequest(system, self.template.render("user", text=piece, options=options),
                             continuations, self.template.chat) for piece in texts], chars_seen

    def decide(self, scores: list[float], shortlist: tuple[str, ...] | None = None) -> Annotation:
        """Turn continuation log-probabilities into distribution, candidates and abstention."""
        if shortlist is not None:
            return self._decide_shortlisted(scores, shortlist)
        if len(scores) != len(self.continuations):
            raise ValueError(f"expected {len(self.continuations)} scores, got {len(scores)}")
        if self.taxonomy.multi_label:
            return self._decide_multi(scores)
        return self._decide_single(scores)

    def candidates_among(self, names: tuple[str, ...], scores: list[float]) -> list[str]:
        """The candidate set (``candidate_mass``) of labels ``names`` scored for a text (a top-down level)."""
        options = self.shortlist_options(names)
        ranked = sorted(zip(options, softmax(scores)), key=lambda kv: -kv[1])
        return _candidate_set([kv for kv in ranked if kv[0] != NONE_LABEL], self.taxonomy.candidate_mass)

    def _decide_shortlisted(self, scores: list[float], shortlist: tuple[str, ...]) -> Annotation:
        """A distribution over every option, 0 outside the shortlist; flat over the shortlist is abstained."""
        options = self.shortlist_options(shortlist)
        if len(scores) != len(options):
            raise ValueError(f"expected {len(options)} scores, got {len(scores)}")
        scored = dict(zip(options, softmax(scores)))
        annotation = decide_single({name: scored.get(name, 0.0) for name in self.options}, self.taxonomy)
        if not annotation.abstained and len(shortlist) > 2 and annotation.confidence < FLAT_FACTOR / len(shortlist):
            annotation = replace(annotation, label=None, labels=[], abstained=True, abstain_reason=FLAT_SHORTLIST)
        return replace(annotation, shortlist=list(shortlist))

    def _decide_single(self, scores: list[float]) -> Annotation:
        """Softmax over options (each divided by its content-free probability, when tuning calibrated it), then the rules."""
        if self.tuning is not None and self.tuning.prior is not None:
            scores = [score - prior for score, prior in zip(scores, self.tuning.prior)]
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


def shortlist_prompting(taxonomy: Taxonomy, strategy: str, max_scored_labels: int) -> tuple[str, bool]:
    """The default template of a shortlisting labeller, and whether its system prompt describes every leaf.

    Where every leaf fits one prompt (at most ``max_scored_labels``), the system prompt stays
    the whole taxonomy with its descriptions, computed once and shared, and only the
    shortlist is scored: the model reads what it read before, for fewer continuations. Past
    that, ``classify_shortlist`` scores the shortlisted names after the document with no list
    (the retriever has read the descriptions): measured on TREC at 500 labels, 12.5 docs/s
    and 12.0% against a listing of each label's description, 2.9 docs/s and 10.0%. Top-down
    levels list their labels with descriptions in the system prompt (``classify``): a level
    has few distinct label sets, so their prompts stay cached.
    """
    if strategy == "top_down":
        return "classify", False
    fits = len(taxonomy.leaves()) <= max_scored_labels
    return ("classify", True) if fits else ("classify_shortlist", False)


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


def in_order(probs: np.ndarray, fitted: list[str], classes: list[str]) -> np.ndarray:
    """Probability columns of a model (in its ``classes_`` order) rearranged to ``classes``; unseen ones get 0."""
    out = np.zeros((len(probs), len(classes)))
    for j, name in enumerate(fitted):
        out[:, classes.index(name)] = probs[:, j]
    return out
