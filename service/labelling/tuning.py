"""Choosing a taxonomy's prompt by measurement on a sample, stored with the taxonomy version.

Which prompt a small model labels well differs by taxonomy: a prompt that lists the
options in the question makes SmolLM2-135M copy one of them on some datasets and is the
best format on others. So nothing is assumed: ``tune`` labels a sample of the user's
documents with every candidate prompt the model can score (the chat prompts ``classify``
and ``classify_terse``; on the embedded engine also the plain completions
``classify_fewshot``, the taxonomy's examples as demonstrations, and ``classify_plain``,
the text then ``Label:``), each as it comes and contextually calibrated (Zhao et al. 2021:
each label's probability divided by its mean over ``CONTENT_FREE`` inputs, texts that say
nothing, so a prompt's pull toward one label cancels), and keeps one of those candidates:

- **with gold labels** (at least ``MIN_GOLD`` sample documents carry a ``label``): the
  highest accuracy on them. The accuracy reported for the choice is cross-fitted: the
  prompt is chosen on one half of the labelled documents and scored on the other, both
  ways, so the evidence is not the maximum of several noisy numbers.
- **without**: the highest agreement (top label) with the embedding annotator, which
  reads the label descriptions and examples with another model. Measured on seeded
  200-document samples of the four development datasets, it picked the most accurate
  prompt on all four; the mutual information between inputs and predicted labels
  (Sorensen et al. 2022), reported beside it, picked it on one (table in
  ``docs/labelling.md``).

The choice is then tested against chance (``chance_p_value``): had no candidate's distributions
been related to the reference (the gold labels when they chose, else the embedding annotator's
distributions), how often would the best of them have followed it as closely? At ``CHANCE_ALPHA``
or more the choice is recorded as not ``informative``, and the default panel weighs that LLM 0
(``Panels.panel``): its scores and the embedding annotator's are then indistinguishable from independent, so one
of them may say nothing about the documents, and averaging it in would blur the other. The
embedding annotator is the one kept, by a measured rule: it was the stronger zero-shot
annotator wherever the two were this far apart (the convention speeches: SmolLM2's tuned
prompt 51.9%, p = 0.193 on 100 documents, against 75.7% for the embedding annotator; news
articles, 73% for the best prompt format against 87.5%), and it reads the whole document and
every label's description and examples where the LLM reads ``model_input_chars``. A job that
lists its annotators runs and weighs them as it says.

Ties keep the earlier candidate (``classify`` uncalibrated, the default, first). The choice
(prompt, calibration and its content-free log-probabilities) and its evidence are stored
per taxonomy version and model; a job on them that names no prompt runs it, and its
annotator spec records the prompt, the calibration and the prior (all in the annotator key,
so cached annotations stay correct), and its panel's ``calibrated_mean`` does not calibrate
it again (the tuning chose its calibration; calibrating twice measured worse, docs/labelling.md).
A job that names a prompt runs it uncalibrated. Single-label
taxonomies only: the embedding annotator, the label-free yardstick, labels only those.
``JobRunner`` runs ``tune`` itself, without labels, on up to 100 of a default-panel job's
documents when the job's taxonomy version has no tuning for its model (``Settings.auto_tune``).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np

from service.engines.base import EMBEDDED_ENGINE
from service.errors import InvalidInput
from service.labelling.labeller import INFORMATIVE, TunedPrompt
from service.labelling.scoring import annotate_texts
from service.vocabulary import Calibration, values

CHAT_CANDIDATES = ("classify", "classify_terse")
COMPLETION_CANDIDATES = ("classify_fewshot", "classify_plain")  # plain text: the embedded engine only
MIN_GOLD = 20  # labelled sample documents needed to choose by accuracy (10 per cross-fitting half)
GOLD = "gold_accuracy"
AGREEMENT = "embedding_agreement"
CONTENT_FREE = ("N/A", "[MASK]", "...")  # texts that say nothing: what a prompt answers to them is its bias
CALIBRATIONS = values(Calibration)
CHANCE_ALPHA = 0.05  # a chosen prompt that chance would follow the reference as closely this often is not informative
PERMUTATIONS = 999  # shuffles of the reference in the chance test: p is resolved to 0.001


@dataclass(frozen=True)
class CandidateResult:
    """One prompt's measurements on the sample."""

    prompt: str
    calibration: str  # "none", or "contextual": each label's probability divided by its content-free one
    agreement: float  # share of documents whose top label matches the embedding annotator's
    mutual_information: float  # nats, between documents and predicted labels (Sorensen et al. 2022)
    top_label_share: float  # share of the most frequent predicted label: near 1 is a prompt that says one thing
    accuracy: float | None  # on the sample's labelled documents, when there are any
    ms_per_doc: float


def candidates(engine: str, requested: list[str] | None) -> list[str]:
    """The prompts to try on a model of ``engine``: those asked for, else every shipped one it can score."""
    allowed = CHAT_CANDIDATES + (COMPLETION_CANDIDATES if engine == EMBEDDED_ENGINE else ())
    if requested is None:
        return list(allowed)
    return list(dict.fromkeys(requested))


def mutual_information(distributions: list[dict[str, float]]) -> float:
    """I(X; Y) = H(mean p) - mean H(p) over the sample's distributions, in nats."""
    def entropy(p: dict[str, float]) -> float:
        return -sum(v * math.log(v) for v in p.values() if v > 0)

    total: defaultdict[str, float] = defaultdict(float)
    for p in distributions:
        for label, value in p.items():
            total[label] += value
    average = {k: v / len(distributions) for k, v in total.items()}
    return entropy(average) - sum(map(entropy, distributions)) / len(distributions)


def calibrated(annotations: list, labeller) -> list:
    """The annotations as ``labeller`` (the same prompt with a tuning's prior) decides them, without scoring again.

    A distribution's logarithms are its scores up to a constant, which the softmax ignores.
    """
    out = []
    for annotation in annotations:
        if annotation.status != "ok" or annotation.chars_seen is None:  # failed or blank: nothing to calibrate
            out.append(annotation)
            continue
        scores = [math.log(max(annotation.distribution[o], 1e-300)) for o in labeller.options]
        decided = labeller.decide(scores)
        out.append(replace(decided, truncated=annotation.truncated, chars_seen=annotation.chars_seen))
    return out


def measure(prompt: str, calibration: str, annotations: list, reference: list, gold: list[str | None],
            seconds: float) -> CandidateResult:
    """A candidate's evidence from its annotations beside the embedding annotator's and the gold labels."""
    labels = [a.label for a in annotations]
    top = Counter(labels).most_common(1)[0][1] / len(labels)
    agree = sum(a == r.label for a, r in zip(labels, reference)) / len(labels)
    labelled = [(a, g) for a, g in zip(labels, gold) if g is not None]
    accuracy = sum(a == g for a, g in labelled) / len(labelled) if labelled else None
    information = mutual_information([a.distribution for a in annotations])
    return CandidateResult(prompt, calibration, round(agree, 4), round(information, 4), round(top, 4),
                           None if accuracy is None else round(accuracy, 4), round(1000 * seconds / len(labels), 1))


def choose(results: list[CandidateResult], labels: list[list], gold: list[str | None],
           seed: int = 0) -> tuple[int, str, float | None]:
    """(index of the chosen candidate, criterion, cross-fitted accuracy of choosing by gold or None).

    ``labels[i]`` are candidate ``results[i]``'s labels of the sample, in order.
    """
    labelled = [i for i, g in enumerate(gold) if g is not None]
    if len(labelled) < MIN_GOLD:
        best = max(range(len(results)), key=lambda c: results[c].agreement)  # max keeps the first of equals
        return best, AGREEMENT, None
    best = max(range(len(results)), key=lambda c: results[c].accuracy or 0.0)
    random.Random(seed).shuffle(labelled)
    halves = (labelled[: len(labelled) // 2], labelled[len(labelled) // 2:])

    def correct(candidate: int, rows: list[int]) -> int:
        return sum(labels[candidate][i] == gold[i] for i in rows)

    hits = 0
    for train, test in (halves, halves[::-1]):
        chosen = max(range(len(results)), key=partial(correct, rows=train))
        hits += correct(chosen, test)
    return best, GOLD, round(hits / len(labelled), 4)


def chance_p_value(candidates: np.ndarray, reference: np.ndarray, chosen: int, seed: int = 0) -> float | None:
    """How often the best candidate would follow ``reference`` as closely as candidate ``chosen`` does if no
    candidate's scores were related to it: a permutation test (the reference's rows shuffled) whose null statistic is
    the maximum over candidates, so choosing one of several is paid for.

    ``candidates``: (candidates, rows, labels) distributions; ``reference``: (rows, labels), the embedding annotator's
    distributions or the gold labels one-hot. A row of NaN is missing: a reference row is left out, a candidate's
    counts for nothing. A candidate follows the reference by the covariance, over rows and labels, of its
    probabilities (``_centred``) with the reference's, each label centred over the rows: agreement made soft (on
    one-hot rows it is top-label agreement less what the labels' frequencies give by chance).
    Soft on both sides, it hears what top labels drop: on Rotten Tomatoes (300-document samples, tuned on their first
    100) an LLM 60.3% accurate beside the embedding annotator's 58.0% had agreed with it no more than chance by top
    labels (p = 0.211) and does by this test (p = 0.001); on the convention speeches, where every prompt is below the
    majority class, it still does not (docs/labelling.md). None when nothing can be tested: fewer than two reference
    rows, or a reference the same on every row (no shuffle changes it, so a blind reference would make every prompt
    look blind)."""
    rows = ~np.isnan(reference).any(axis=1)
    if rows.sum() < 2:
        return None
    truth = reference[rows] - reference[rows].mean(axis=0)
    if np.abs(truth).max() < 1e-12:
        return None
    scores = _centred(candidates[:, rows]).reshape(len(candidates), -1)
    observed = scores[chosen] @ truth.ravel()
    rng = np.random.default_rng(seed)
    reached = sum(int((scores @ truth[rng.permutation(len(truth))].ravel()).max() >= observed - 1e-9)
                  for _ in range(PERMUTATIONS))
    return (1 + reached) / (1 + PERMUTATIONS)


def _centred(candidates: np.ndarray) -> np.ndarray:
    """Each candidate's probabilities, each label centred over the rows (a prompt's pull toward one label counts for
    nothing) and the candidate scaled to unit spread (the maximum compares like with like); 0 on missing rows.

    Probabilities, not their logarithms: bounded, so a row a 135M model is sure and wrong about weighs no more than
    any other (a log-probability of 1e-9 outweighed dozens of moderate rows). On the samples of docs/labelling.md they
    also told the informative prompts (Rotten Tomatoes p = 0.006 / 0.001 against 0.008 / 0.007) and the blind one
    (the speeches, 0.193 / 0.119 against 0.185 / 0.071) apart more clearly.
    """
    missing = np.isnan(candidates).any(axis=2, keepdims=True)
    scores = np.where(missing, 0.0, np.nan_to_num(candidates))
    present = np.maximum((~missing).sum(axis=1, keepdims=True), 1)
    scores = np.where(missing, 0.0, scores - scores.sum(axis=1, keepdims=True) / present)
    spread = scores.std(axis=(1, 2), keepdims=True)
    return scores / np.where(spread > 0, spread, 1.0)


def distributions(annotations: list, options: tuple[str, ...]) -> np.ndarray:
    """Annotations' distributions as rows over ``options``; NaN where one has none (failed, or a blank text), as
    ``chance_p_value`` reads them. An abstention keeps its distribution: it still says how the labels compare."""
    rows = [[a.distribution.get(o, 0.0) for o in options] if a.status == "ok" else [] for a in annotations]
    return np.array([row if sum(row) > 0 else [np.nan] * len(options) for row in rows])


def one_hot(labels: list[str | None], options: tuple[str, ...]) -> np.ndarray:
    """Labels as rows over ``options`` (1 at the label), NaN where there is none, as ``chance_p_value`` reads them."""
    return np.array([[float(o == label) for o in options] if label is not None else [np.nan] * len(options)
                     for label in labels])


def beats_chance(p_value: float | None) -> bool:
    """Whether a chance test's p makes the choice ``informative``: under ``CHANCE_ALPHA``, or not testable (None)."""
    return p_value is None or p_value < CHANCE_ALPHA


async def tune(panels, taxonomy_name: str, version: str | None, model: str | None, texts: list[str],
               gold: list[str | None], prompts: list[str] | None = None,
               calibrations: list[Calibration] | None = None) -> dict:
    """Label the sample with every candidate prompt (each calibrated as ``calibrations`` says) and the embedding
    annotator; store and return the choice."""
    stored = await asyncio.to_thread(panels.store.taxonomies.get, taxonomy_name, version)
    taxonomy, found = stored.taxonomy, stored.version
    if taxonomy.multi_label:
        raise InvalidInput(f"taxonomy {taxonomy.name!r} is multi-label; prompt tuning covers single-label taxonomies "
                           "(its label-free yardstick, the embedding annotator, labels only those)")
    if taxonomy.shortlist is not None:
        raise InvalidInput(f"taxonomy {taxonomy.name!r} is shortlisted; its prompt follows the shortlist "
                           "(docs/labelling.md, Large taxonomies), not a tuning")
    known = set(taxonomy.label_names())
    for i, label in enumerate(gold):
        if label is not None and label not in known:
            raise InvalidInput(f"documents[{i}].label {label!r} is not a label of taxonomy {taxonomy.name!r}; "
                               f"its labels: {', '.join(sorted(known))}")
    chosen_model = panels.model(model or taxonomy.model)
    reference_labeller = await asyncio.to_thread(panels.embedding_labeller, taxonomy, found)
    reference = await annotate_texts(reference_labeller, texts, panels.scorer(reference_labeller))
    options = reference_labeller.options  # the reference's order: each candidate's distribution is read in it
    results, labels, choices, seen_distributions = [], [], [], []
    for prompt in candidates(chosen_model.info.engine, prompts):
        labeller = await asyncio.to_thread(panels.labeller, taxonomy.name, found, chosen_model.name, prompt)
        started = time.perf_counter()
        annotations = await annotate_texts(labeller, texts, panels.scorer(labeller))
        seconds = time.perf_counter() - started
        neutral = await annotate_texts(labeller, list(CONTENT_FREE), panels.scorer(labeller))
        prior = tuple(math.log(max(sum(a.distribution.get(o, 0.0) for a in neutral) / len(neutral), 1e-12))
                      for o in labeller.options)
        for calibration in calibrations or CALIBRATIONS:
            choice = TunedPrompt(prompt, calibration, None if calibration == "none" else prior)
            seen = annotations if calibration == "none" else calibrated(annotations, replace(labeller, tuning=choice))
            results.append(measure(prompt, calibration, seen, reference, gold, seconds))
            labels.append([a.label for a in seen])
            seen_distributions.append(distributions(seen, options))
            choices.append(choice)
    best, criterion, cross_fitted = choose(results, labels, gold)
    truth = one_hot(gold, options) if criterion == GOLD else distributions(reference, options)
    p_value = chance_p_value(np.stack(seen_distributions), truth, best)
    choice = replace(choices[best], informative=beats_chance(p_value))
    labelled = [g for g in gold if g is not None]
    evidence = {
        "documents": len(texts), "labelled": len(labelled),
        "candidates": [asdict(r) for r in results],
        "embedding_model": reference_labeller.encoder,  # the yardstick agreement was measured against
        "embedding_accuracy": (round(sum(r.label == g for r, g in zip(reference, gold) if g is not None)
                                     / len(labelled), 4) if labelled else None),
        "cross_fitted_accuracy": cross_fitted,
        "chance_p_value": None if p_value is None else round(p_value, 4),
    }
    await asyncio.to_thread(panels.store.taxonomies.put_tuning, taxonomy.name, found, chosen_model.name, choice, criterion,
                            evidence)
    return {"taxonomy": taxonomy.name, "version": found, "model": chosen_model.name, "prompt": choice.prompt,
            "calibration": choice.calibration, "criterion": criterion, **evidence, INFORMATIVE: choice.informative}
