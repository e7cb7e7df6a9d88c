"""Which annotators label a job: the panel factory and the one place that knows the models.

``Panels`` builds an LLM annotator for a taxonomy version on a model (its prompt: the one
named, the tuned one, or the default; its shortlist and demonstrations), the embedding
annotator and distilled students, a panel of several of them for a job, and the scorer each
one is scored through. ``job_record`` is what the store keeps of a panel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from service.engines.base import EMBEDDED_ENGINE, EngineInfo
from service.engines.embeddings import Embedder, shared_embedder
from service.errors import InvalidInput
from service.labelling.aggregation import DEFAULT_METHOD, silent
from service.labelling.annotators import EMBEDDING, ClassifierLabeller, EmbeddingLabeller, Student
from service.labelling.demonstrations import Demonstrator, pool_hash
from service.labelling.labeller import Labeller, annotator_key, demonstrations, shortlist_prompting
from service.labelling.prompts import PromptTemplate, load_template
from service.labelling.scoring import (
    Annotator,
    PromptReading,
    Reading,
    Scorer,
    embedding_scorer,
    over_text,
    student_scorer,
)
from service.labelling.shortlist import TOP_DOWN, Shortlister, TopDown
from service.store import Store
from service.store.jobs import Job
from service.taxonomy import NONE_LABEL, Demonstrations, Shortlist, Taxonomy
from service.vocabulary import LongDocuments
from service.work.kept_vectors import KeptVectors

log = logging.getLogger(__name__)
SHORTLISTERS_KEPT = 4  # retrievers (and demonstrators) kept built: each holds its embedded prototypes or pool
FEWSHOT = "classify_fewshot"  # the template that shows demonstrations
AUTO_TUNE = "auto_tune"  # in a job's annotator spec until it has tuned its prompt on its own documents
CASCADE = "cascade"  # the aggregation of a student-then-LLM job: the LLM's label where it was asked
DEFAULT_PANEL = "default_panel"  # in a job's annotator spec when the service chose its annotators (the job listed none)
NOT_READ = ("name", "annotator", "demonstrations", "tuning")  # a member's spec that changes its name or scores, not
# the prompt it reads in


@dataclass(frozen=True)
class Model:
    """A named model jobs can label with: how to call it, and what identifies its outputs."""

    name: str
    scorer: Scorer
    info: EngineInfo
    reader: PromptReading | None = None  # its reading of prompts (``Reader``), where the engine can give one


class Panels:
    """Builds annotators and panels from the store's taxonomies, tunings, students and gold labels."""

    def __init__(self, store: Store, models: dict[str, Model], default_model: str, *, model_input_chars: int,
                 students=None, max_scored_labels: int = 100, embedding_model_dir: Path | None = None):
        self.store = store
        self.models = models
        self.default_model = default_model
        self.model_input_chars = model_input_chars
        self.students = students  # the StudentServer deployment handle, for cascades
        self.max_scored_labels = max_scored_labels
        self.embedding_model_dir = embedding_model_dir  # None: MiniLM (ANNOTATE_EMBEDDING_MODEL_DIR)
        self._shortlisters: dict[tuple, Shortlister] = {}
        self._demonstrators: dict[tuple, Demonstrator] = {}
        self._kept_vectors = KeptVectors()  # what the refinement read, so a job relabelled again reads only new texts

    def labeller(self, taxonomy_name: str, version: str | None = None, model: str | None = None,
                 prompt: str | None = None, long_documents: LongDocuments | None = None,
                 shortlist: dict | None = None, before: datetime | None = None) -> Labeller:
        """The LLM annotator for a taxonomy version on a model (the one named, else the taxonomy's, else the default).

        ``shortlist`` (a job's) overrides the taxonomy's; a single-label taxonomy of more than
        ``max_scored_labels`` leaves is scored only through a shortlist. With no ``prompt``, the one
        a tuning chose for this taxonomy version and model, with its calibration (``service.labelling.tuning``),
        else the default; a prompt the job names runs uncalibrated. A taxonomy with
        ``demonstrations`` gets them per document from its examples and the texts people labelled
        in its jobs created ``before`` (the job's own creation: a resumed job sees the same pool),
        through ``classify_fewshot`` unless the job or the tuning names another template that shows them.
        """
        stored = self.store.taxonomies.get(taxonomy_name, version)
        taxonomy, version = stored.taxonomy, stored.version
        chosen = self.model(model or taxonomy.model)
        plan = Shortlist.model_validate(shortlist) if shortlist else taxonomy.shortlist
        default, whole_prompt = "classify_multi" if taxonomy.multi_label else "classify", False
        if plan is not None and not taxonomy.multi_label:
            default, whole_prompt = shortlist_prompting(taxonomy, plan.strategy, self.max_scored_labels)
        tuned = None
        if prompt is None and plan is None and not taxonomy.multi_label:
            tuned = self.store.taxonomies.tuned_prompt(taxonomy.name, version, chosen.name)  # None: never tuned
        if taxonomy.demonstrations is not None and prompt is None and not (tuned and _shows_demonstrations(
                load_template(tuned.prompt))):
            default, tuned = FEWSHOT, None
        template = load_template(prompt or (tuned.prompt if tuned else default))
        if not template.chat and chosen.info.engine != EMBEDDED_ENGINE:
            raise InvalidInput(f"prompt {template.name!r} is a plain-text completion, which only the embedded engine "
                               f"scores; model {chosen.name!r} runs {chosen.info.engine}: choose a chat template")
        leaves = len(taxonomy.leaves())
        if plan is not None and taxonomy.multi_label:
            raise InvalidInput(f"taxonomy {taxonomy.name!r} is multi-label; shortlists cover single-label taxonomies")
        if plan is None and leaves > self.max_scored_labels:
            fix = ("multi-label taxonomies are scored whole (a yes and a no for every label), so split it" if
                   taxonomy.multi_label else "set 'shortlist: {k: auto}' in the taxonomy, or give the job "
                   "\"shortlist\": {\"k\": 10}, so each document is scored on its most plausible labels only")
            raise InvalidInput(f"taxonomy {taxonomy.name!r} has {leaves} labels to score, more than one prompt holds "
                               f"(ANNOTATE_MAX_SCORED_LABELS = {self.max_scored_labels}): {fix}")
        largest = None if plan is None else ("k", plan.k) if isinstance(plan.k, int) else ("max_k", plan.max_k)
        if largest is not None and largest[1] > self.max_scored_labels:
            raise InvalidInput(f"shortlist {largest[0]} = {largest[1]} is more labels than one prompt holds "
                               f"(ANNOTATE_MAX_SCORED_LABELS = {self.max_scored_labels}); a shortlist is the few most "
                               "plausible labels: try 10")
        demonstrator = None
        if taxonomy.demonstrations is not None:
            if plan is not None:
                raise InvalidInput(f"taxonomy {taxonomy.name!r} sets both 'demonstrations' and a shortlist; per-document "
                                   "demonstrations cover taxonomies scored whole")
            if not _shows_demonstrations(template):
                raise InvalidInput(f"prompt {template.name!r} shows no demonstrations, and taxonomy {taxonomy.name!r} "
                                   f"sets 'demonstrations': name {FEWSHOT!r} (or no prompt)")
            demonstrator = self._demonstrator(taxonomy, taxonomy.demonstrations, before)
        return Labeller(taxonomy, version, template, chosen.info, self.model_input_chars, model=chosen.name,
                        long_documents=long_documents, whole_prompt=whole_prompt, tuning=tuned,
                        shortlister=None if plan is None else self._shortlister(taxonomy, version, plan),
                        demonstrator=demonstrator)

    def _demonstrator(self, taxonomy: Taxonomy, plan: Demonstrations, before: datetime | None) -> Demonstrator:
        """A demonstrator over the taxonomy's examples and labelled texts, its pool embedded once while it recurs."""
        names = set(taxonomy.label_names())  # gold of other versions may name labels this one lacks
        pool = demonstrations(taxonomy) + [(label, text) for text, label in self.store.quality.labelled_texts(
            taxonomy.name, before=before) if label in names]
        embedder = self.embedder()
        key = (plan, pool_hash(pool), embedder.identity)
        if key not in self._demonstrators:
            if len(self._demonstrators) >= SHORTLISTERS_KEPT:
                self._demonstrators.pop(next(iter(self._demonstrators)))
            self._demonstrators[key] = Demonstrator(pool, plan, embedder.embed_documents, encoder=embedder.identity)
        return self._demonstrators[key]

    def _shortlister(self, taxonomy: Taxonomy, version: str, plan: Shortlist) -> Shortlister | TopDown:
        """The taxonomy version's retriever for ``plan``, rebuilt when people have labelled more of its texts."""
        if plan.strategy == TOP_DOWN:
            return TopDown(taxonomy)
        embedder = self.embedder()
        key = (taxonomy.name, version, plan.k, plan.recall, plan.max_k, self.store.quality.labelled_count(taxonomy.name),
               embedder.identity)
        if key not in self._shortlisters:
            labelled = self.store.quality.labelled_texts(taxonomy.name)  # read (and embedded) only when the key is new
            if len(self._shortlisters) >= SHORTLISTERS_KEPT:
                self._shortlisters.pop(next(iter(self._shortlisters)))
            self._shortlisters[key] = Shortlister(taxonomy, embedder.embed, k=plan.k, recall=plan.recall,
                                                  max_k=plan.max_k, labelled=labelled, encoder=embedder.identity)
        return self._shortlisters[key]

    def panel(self, taxonomy_name: str, version: str | None, model: str | None, annotators: list[dict] | None,
              long_documents: LongDocuments | None = None, shortlist: dict | None = None,
              before: datetime | None = None, *, default: bool = False) -> list[tuple[dict, Annotator]]:
        """A job's annotators, each (its job_annotators row, its labeller); one LLM annotator when none are listed.

        ``long_documents`` overrides the taxonomy's for the LLM annotators (the others read the head);
        ``before``: the job's creation, for the demonstrations' pool (``labeller``). ``default``: the service's own
        panel (the job listed none), whose LLM is weighed 0 when its tuned prompt is not informative
        (``service.labelling.tuning``); a member weighed 0 is not scored (``aggregation.silent``). Annotators a job
        lists are run and weighed as it says.
        """
        entries = annotators or [{"kind": "llm"}]
        panel: list[tuple[dict, Annotator]] = []
        labeller: Annotator
        for i, entry in enumerate(entries):
            where = f"annotators[{i}]"
            if entry.get("kind") == "classifier":
                labeller = self._student(taxonomy_name, version, entry.get("classifier") or entry["model"], where)
                name = entry.get("name") or f"student/{labeller.student.name}"
            elif entry.get("kind") == EMBEDDING:
                stored = self.store.taxonomies.get(taxonomy_name, version)
                if stored.taxonomy.multi_label:
                    raise InvalidInput(f"{where}: the embedding annotator labels single-label taxonomies only")
                labeller = self.embedding_labeller(stored.taxonomy, stored.version)
                name = entry.get("name") or EMBEDDING
            else:
                labeller = self.labeller(taxonomy_name, version, entry.get("model") or model, entry.get("prompt"),
                                         long_documents, shortlist, before)
                name = entry.get("name") or f"{labeller.model}/{labeller.template.name}"
            panel.append(({"name": name, "annotator": labeller.key, "kind": entry.get("kind") or "llm",
                           "model": entry.get("model") or entry.get("classifier"), "prompt": entry.get("prompt"),
                           "weight": entry.get("weight")}, labeller))
        if len(panel) > 1:
            _check_panel(panel)
            for row, labeller in panel:
                if default and row["weight"] is None and _uninformative(labeller):
                    row["weight"] = 0.0
        return panel

    def _student(self, taxonomy_name: str, version: str | None, ref: str, where: str) -> ClassifierLabeller:
        """A ready student of the job's taxonomy version, as an annotator."""
        stored = self.store.taxonomies.get(taxonomy_name, version)
        taxonomy, found = stored.taxonomy, stored.version
        student = self.store.classifiers.get(ref)
        if student.status != "ready":
            raise InvalidInput(f"{where}: classifier {student.classifier_id} is {student.status}, not ready")
        if (student.taxonomy, student.taxonomy_version) != (taxonomy.name, found):
            raise InvalidInput(f"{where}: classifier {student.classifier_id} learnt {student.taxonomy} version "
                               f"{student.taxonomy_version}, not {taxonomy.name} version {found}")
        return ClassifierLabeller(taxonomy, found, Student(student.classifier_id, student.name, student.kind, student.path or ''),
                                  self.model_input_chars)

    def scorer(self, labeller: Annotator) -> Scorer:
        """How to score an annotator's requests: its model deployment, the StudentServer, or the embedder."""
        if isinstance(labeller, ClassifierLabeller):
            if self.students is None:
                raise RuntimeError("this runner has no StudentServer; cascades run inside the service")
            return student_scorer(labeller, self.students)
        if isinstance(labeller, EmbeddingLabeller):
            return embedding_scorer(labeller, self.document_vectors())
        return self.models[labeller.model].scorer

    def embedding_labeller(self, taxonomy: Taxonomy, version: str) -> EmbeddingLabeller:
        """The embedding annotator of a taxonomy version, keyed by the encoder that reads for it."""
        return EmbeddingLabeller(taxonomy, version, self.model_input_chars, encoder=self.embedder().identity)

    def embedder(self) -> Embedder:
        """The encoder that reads the jobs' documents (embedding annotator, refinement, demonstrations, shortlists,
        induction): ``ANNOTATE_EMBEDDING_MODEL_DIR``, else MiniLM."""
        return shared_embedder(self.embedding_model_dir)

    def reader(self, job: Job) -> Reading | None:
        """How the job's first LLM member reads its documents for the refinement, in the prompt the job recorded for
        it (each document's first window, the taxonomy's fixed examples where demonstrations are chosen per
        document): None if the job has no LLM member, its engine cannot read (an OpenAI-compatible server), or its
        documents are scored on shortlists (each its own prompt). What it read is kept (``KeptVectors``) under the
        member's recorded spec but for what changes its scores and not its prompt (``NOT_READ``), so a growing
        demonstration pool or a new calibration does not read the texts again; the prompt is built only when there
        are texts to read (a relabelling that reads none builds nothing), and when the service's settings no longer
        build it the reading is None, with a warning: the encoder alone reads then. A member the chance test silenced
        (``aggregation.silent``) gives its reading over the text only: its answers were shown to say nothing of the
        documents, so its state at the answer is left out (docs/labelling.md: on the convention speeches 76.7% with no
        gold label, against 74.6% with it)."""
        member = next((member for member in job.annotators if member.kind == "llm"), None)
        model = self.models.get((member.model if member else None) or job.model)
        recorded: dict = next((spec for spec in job.annotator_spec.get("members", [])  # one annotator: no refinement
                               if spec["annotator"] == member.annotator), {}) if member else {}
        if (member is None or model is None or model.reader is None or "prompt" not in recorded
                or "shortlist" in recorded):
            return None
        read = model.reader

        def prompted(texts: list[str]) -> np.ndarray | None:
            try:  # the recorded prompt, not a later tuning's
                labeller = self.labeller(job.taxonomy, job.taxonomy_version, model.name, recorded["prompt"],
                                         job.long_documents, job.shortlist, job.created_at)
            except InvalidInput as exc:
                log.warning("the job's prompt cannot be built; refining on the encoder's vectors alone",
                            extra={"job_id": job.job_id, "error": str(exc)})
                return None
            return read([labeller.reading_request(text) for text in texts])

        read_in = annotator_key({k: v for k, v in recorded.items() if k not in NOT_READ})  # holds the numeric type
        kept = self._kept_vectors.cached(f"{model.name} {read_in}", prompted)
        return _over_text(kept) if silent(member.weight) else kept

    def document_vectors(self) -> Callable[[list[str]], np.ndarray]:
        """The encoder's vectors of texts, kept (``KeptVectors``): the embedding annotator and the refinement both
        read a document's first ``DOCUMENT_CHARS``, so the job's own refinement embeds nothing the annotator did."""
        embedder = self.embedder()
        return self._kept_vectors.cached(embedder.identity, embedder.embed_documents)

    def model(self, name: str | None) -> Model:
        """The named model (the default for None); an unknown name is refused with the names there are."""
        name = name or self.default_model
        if name not in self.models:
            raise InvalidInput(f"unknown model {name!r}; this service has {', '.join(sorted(self.models))} "
                               "(ANNOTATE_MODELS_FILE)")
        return self.models[name]

    def untuned(self, labeller: Annotator) -> bool:
        """Whether prompt tuning could choose this LLM annotator's prompt and has not yet (``Settings.auto_tune``)."""
        return (isinstance(labeller, Labeller) and not labeller.taxonomy.multi_label and labeller.shortlister is None
                and labeller.demonstrator is None
                and self.store.taxonomies.tuned_prompt(labeller.taxonomy.name, labeller.taxonomy_version, labeller.model) is None)


def requested(entry: dict) -> dict:
    """A stored member as its job asked for it: a weight of 0 is the chance test's (a request's are above 0), so the
    panel decides it again from the tuning there is now."""
    return entry | {"weight": None} if silent(entry.get("weight")) else entry


def _over_text(read: Reading) -> Reading:
    """``read`` giving only its view over each document's tokens (``over_text``), not its state at the answer."""
    def read_over_text(texts: list[str]) -> np.ndarray | None:
        reading = read(texts)
        return None if reading is None else over_text(reading)
    return read_over_text


def _uninformative(labeller: Annotator) -> bool:
    """Whether an annotator is an LLM whose tuned prompt followed the tuning's reference no more than chance: the
    default panel weighs it 0 (``service.labelling.tuning``)."""
    return isinstance(labeller, Labeller) and labeller.tuning is not None and not labeller.tuning.informative


def _check_panel(panel: list[tuple[dict, Annotator]]) -> None:
    """Several annotators need distinct names and annotators, and a single-label taxonomy to vote on."""
    names = [row["name"] for row, _ in panel]
    for name in names:
        if names.count(name) > 1:
            raise InvalidInput(f"annotators: the name {name!r} is used twice; give each annotator its own 'name'")
    keys = [row["annotator"] for row, _ in panel]
    if len(set(keys)) < len(keys):
        raise InvalidInput("annotators: two entries describe the same annotator (same kind, model and prompt)")
    if panel[0][1].taxonomy.multi_label:
        raise InvalidInput("annotators: several annotators vote on single-label taxonomies only; a multi-label "
                           "taxonomy takes one annotator")


def _output_annotator(panel: list[tuple[dict, Annotator]]) -> str:
    """The annotator key a job's labels are stored under: its only annotator's, or the aggregate's."""
    if len(panel) == 1:
        return panel[0][1].key
    return "agg-" + annotator_key({"members": sorted(row["annotator"] for row, _ in panel)})[:12]


def _panel_spec(panel: list[tuple[dict, Annotator]], aggregation: str | None, threshold: float | None) -> dict:
    """The job's recorded annotator spec: the labeller's own, or the members' and the aggregation method."""
    if len(panel) == 1:
        return panel[0][1].spec
    return {"aggregation": aggregation or DEFAULT_METHOD, **({"threshold": threshold} if aggregation == CASCADE else {}),
            "members": [{"name": row["name"], "annotator": row["annotator"], **labeller.spec} for row, labeller in panel]}


def job_record(panel: list[tuple[dict, Annotator]], *, aggregation: str | None = None,
               threshold: float | None = None, auto_tune: bool = False, default: bool = False) -> dict:
    """The store fields that say who labels a job: version, output annotator, spec and the annotators' rows.

    ``auto_tune``: the job tunes its prompt on its own documents before labelling (``JobRunner.run``);
    ``default``: the panel is the service's (``Panels.panel``), whose LLM's weight follows its tuning.
    """
    spec = (_panel_spec(panel, aggregation, threshold) | ({AUTO_TUNE: True} if auto_tune else {})
            | ({DEFAULT_PANEL: True} if default else {}))
    return dict(version=panel[0][1].taxonomy_version, annotator=_output_annotator(panel), annotator_spec=spec,
                annotators=[row for row, _ in panel])


def _shows_demonstrations(template: PromptTemplate) -> bool:
    """Whether a template's system prompt renders the demonstrations it is given."""
    marker = "\x00demonstration\x00"
    try:
        shown = template.render("system", instruction="", labels=[], allow_none=False, none_label=NONE_LABEL,
                                multi_label=False, demonstrations=[("label", marker)])
    except InvalidInput:  # no system section
        return False
    return marker in shown


def annotation_keys(job_id: str, labeller: Annotator) -> dict:
    """The columns that identify who made an annotation, shared by every row of a job."""
    spec = labeller.spec
    return dict(job_id=job_id, annotator=labeller.key, model=spec["model"], engine=spec["engine"],
                prompt_hash=spec["prompt_hash"], taxonomy_version=spec["taxonomy_version"],
                decoding=json.dumps(spec["decoding"], sort_keys=True))

