"""Background labelling jobs: batches in, annotations committed per batch, resumable.

A job is a stream of batches. For each batch the runner reads documents that have no
annotation yet (so a restart resumes where the last commit left off and never
duplicates), serves what it can from the cache (same text, same annotator key), scores
the rest through the engine, retries documents whose scoring failed one at a time,
records the ones that still fail as ``failed`` with the error, and commits the batch
in one write. Cancellation is checked between batches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from service.engines.base import EMBEDDED_ENGINE, EngineInfo
from service.engines.embeddings import DOCUMENT_CHARS, shared_embedder
from service.errors import Conflict, InvalidInput
from service.labelling.aggregation import DEFAULT_METHOD, REFINED, aggregate
from service.labelling.annotators import EMBEDDING, ClassifierLabeller, EmbeddingLabeller, Student
from service.labelling.demonstrations import Demonstrator, pool_hash
from service.labelling.labeller import Labeller, annotator_key, demonstrations, shortlist_prompting
from service.labelling.prompts import PromptTemplate, load_template
from service.labelling.refinement import refined_annotations
from service.labelling.scoring import Annotator, Scorer, annotate_texts, embedding_scorer, student_scorer
from service.labelling.shortlist import TOP_DOWN, Shortlister, TopDown
from service.labelling.tuning import tune
from service.store import Store
from service.store.annotations import annotation_row
from service.store.jobs import Job
from service.taxonomy import NONE_LABEL, Shortlist, Taxonomy
from service.work.tasks import Tasks

log = logging.getLogger(__name__)

SHORTLISTERS_KEPT = 4  # retrievers (and demonstrators) kept built: each holds its embedded prototypes or pool
FEWSHOT = "classify_fewshot"  # the template that shows demonstrations
AUTO_TUNE = "auto_tune"  # in a job's annotator spec until it has tuned its prompt on its own documents
AUTO_TUNE_DOCUMENTS = 100  # the job's documents a tuning labels with every candidate
AUTO_TUNE_MIN_DOCUMENTS = 20  # fewer say too little to choose a prompt for every later job of the taxonomy
CASCADE = "cascade"  # the aggregation of a student-then-LLM job: the LLM's label where it was asked


@dataclass(frozen=True)
class Model:
    """A named model jobs can label with: how to call it, and what identifies its outputs."""

    name: str
    scorer: Scorer
    info: EngineInfo


class JobRunner:
    """Runs queued jobs with a small pool of workers; one instance per store.

    Jobs stream through ``run_stream`` batch by batch; jobs created with a ``batch``
    plan (large server-side corpora) go to ``batch_runner`` (Ray Data, ``service.work.batch``).
    """

    def __init__(self, store: Store, models: dict[str, Model], default_model: str, *, batch_size: int,
                 model_input_chars: int, workers: int = 1, batch_runner=None, students=None,
                 max_scored_labels: int = 100):
        self.store = store
        self.max_scored_labels = max_scored_labels
        self._shortlisters: dict[tuple, Shortlister] = {}
        self._demonstrators: dict[tuple, Demonstrator] = {}
        self.students = students  # the StudentServer deployment handle, for cascades
        self.models = models
        self.default_model = default_model
        self.batch_size = batch_size
        self.model_input_chars = model_input_chars
        self.batch_runner = batch_runner
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers = Tasks()
        for _ in range(workers):
            self._workers.start(self._work())

    def labeller(self, taxonomy_name: str, version: str | None = None, model: str | None = None,
                 prompt: str | None = None, long_documents: str | None = None,
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
        if plan is None and leaves > self.max_scored_labels and not taxonomy.multi_label:
            raise InvalidInput(
                f"taxonomy {taxonomy.name!r} has {leaves} labels to score, more than one prompt holds "
                f"(ANNOTATE_MAX_SCORED_LABELS = {self.max_scored_labels}): set 'shortlist: {{k: auto}}' in the "
                "taxonomy, or give the job \"shortlist\": {\"k\": 10}, so each document is scored on its most "
                "plausible labels only")
        if plan is not None and taxonomy.multi_label:
            raise InvalidInput(f"taxonomy {taxonomy.name!r} is multi-label; shortlists cover single-label taxonomies")
        demonstrator = None
        if taxonomy.demonstrations is not None:
            if plan is not None:
                raise InvalidInput(f"taxonomy {taxonomy.name!r} sets both 'demonstrations' and a shortlist; per-document "
                                   "demonstrations cover taxonomies scored whole")
            if not _shows_demonstrations(template):
                raise InvalidInput(f"prompt {template.name!r} shows no demonstrations, and taxonomy {taxonomy.name!r} "
                                   f"sets 'demonstrations': name {FEWSHOT!r} (or no prompt)")
            demonstrator = self._demonstrator(taxonomy, before)
        return Labeller(taxonomy, version, template, chosen.info, self.model_input_chars, model=chosen.name,
                        long_documents=long_documents, whole_prompt=whole_prompt, prior=tuned.prior if tuned else None,
                        shortlister=None if plan is None else self._shortlister(taxonomy, version, plan),
                        demonstrator=demonstrator)

    def _demonstrator(self, taxonomy: Taxonomy, before: datetime | None) -> Demonstrator:
        """A demonstrator over the taxonomy's examples and labelled texts, its pool embedded once while it recurs."""
        names = set(taxonomy.label_names())  # gold of other versions may name labels this one lacks
        pool = demonstrations(taxonomy) + [(label, text) for text, label in self.store.quality.labelled_texts(
            taxonomy.name, before=before) if label in names]
        key = (taxonomy.demonstrations, pool_hash(pool))
        if key not in self._demonstrators:
            if len(self._demonstrators) >= SHORTLISTERS_KEPT:
                self._demonstrators.pop(next(iter(self._demonstrators)))
            self._demonstrators[key] = Demonstrator(pool, taxonomy.demonstrations, shared_embedder().embed_documents)
        return self._demonstrators[key]

    def _shortlister(self, taxonomy: Taxonomy, version: str, plan: Shortlist) -> Shortlister | TopDown:
        """The taxonomy version's retriever for ``plan``, rebuilt when people have labelled more of its texts."""
        if plan.strategy == TOP_DOWN:
            return TopDown(taxonomy)
        key = (taxonomy.name, version, plan.k, plan.recall, plan.max_k, self.store.quality.labelled_count(taxonomy.name))
        if key not in self._shortlisters:
            labelled = self.store.quality.labelled_texts(taxonomy.name)  # read (and embedded) only when the key is new
            if len(self._shortlisters) >= SHORTLISTERS_KEPT:
                self._shortlisters.pop(next(iter(self._shortlisters)))
            self._shortlisters[key] = Shortlister(taxonomy, shared_embedder().embed, k=plan.k, recall=plan.recall,
                                                  max_k=plan.max_k, labelled=labelled)
        return self._shortlisters[key]

    def panel(self, taxonomy_name: str, version: str | None, model: str | None, annotators: list[dict] | None,
              long_documents: str | None = None, shortlist: dict | None = None,
              before: datetime | None = None) -> list[tuple[dict, Annotator]]:
        """A job's annotators, each (its job_annotators row, its labeller); one LLM annotator when none are listed.

        ``long_documents`` overrides the taxonomy's for the LLM annotators (the others read the head);
        ``before``: the job's creation, for the demonstrations' pool (``labeller``).
        """
        entries = annotators or [{"kind": "llm"}]
        panel = []
        for i, entry in enumerate(entries):
            where = f"annotators[{i}]"
            if entry.get("kind") == "classifier":
                labeller = self._student(taxonomy_name, version, entry.get("classifier") or entry["model"], where)
                name = entry.get("name") or f"student/{labeller.student.name}"
            elif entry.get("kind") == EMBEDDING:
                stored = self.store.taxonomies.get(taxonomy_name, version)
                if stored.taxonomy.multi_label:
                    raise InvalidInput(f"{where}: the embedding annotator labels single-label taxonomies only")
                labeller = EmbeddingLabeller(stored.taxonomy, stored.version, self.model_input_chars)
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
            return embedding_scorer(labeller, lambda texts: shared_embedder().embed_documents(texts))
        return self.models[labeller.model].scorer

    def model(self, name: str | None) -> Model:
        """The named model (the default for None); an unknown name is refused with the names there are."""
        name = name or self.default_model
        if name not in self.models:
            raise InvalidInput(f"unknown model {name!r}; this service has {', '.join(sorted(self.models))} "
                               "(ANNOTATE_MODELS_FILE)")
        return self.models[name]

    def submit(self, job_id: str) -> None:
        """Queue a job that the store already holds."""
        self._queue.put_nowait(job_id)

    def resume(self) -> list[str]:
        """Queue every job left queued or running by an earlier process."""
        jobs = self.store.jobs.active()
        for job_id in jobs:
            self.submit(job_id)
        return jobs

    async def close(self) -> None:
        """Stop the workers; unfinished jobs stay active in the store and resume on restart."""
        if self.batch_runner is not None:
            self.batch_runner.stop()
        await self._workers.close()

    async def _work(self) -> None:
        """Worker loop: take a job id, run it to its end, log and record any crash."""
        while True:
            job_id = await self._queue.get()
            try:
                await self.run(job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a job-level failure: record it, keep serving others
                log.exception("job failed", extra={"job_id": job_id})
                try:
                    await asyncio.to_thread(self.store.jobs.set_status, job_id, "failed",
                                            error=f"{type(exc).__name__}: {exc}", only_if_active=True)
                except Exception:  # the store itself is failing (disk full): the job stays active, resumes on restart
                    log.critical("could not record the job's failure", exc_info=True, extra={"job_id": job_id})

    async def run(self, job_id: str) -> None:
        """Label every pending document of a job (streamed, or through the batch runner), then aggregate."""
        job = await asyncio.to_thread(self.store.jobs.get, job_id)
        if job.status not in ("queued", "running"):
            return
        if job.annotator_spec.get(AUTO_TUNE):
            await asyncio.to_thread(self.store.jobs.set_status, job_id, "running", only_if_active=True)
            await self._tune_first(job)
            job = await asyncio.to_thread(self.store.jobs.get, job_id)
        panel = await asyncio.to_thread(self._job_panel, job)
        await asyncio.to_thread(self.store.jobs.set_status, job_id, "running", only_if_active=True)
        if job.batch is not None:
            if self.batch_runner is None:
                raise RuntimeError("this service runs no batch runner (Ray Data); resubmit without 'mode': 'batch'")
            finished = await asyncio.to_thread(self.batch_runner.run, job_id, panel[0][1])
        elif job.annotator_spec.get("aggregation") == CASCADE:
            (_, student), (_, llm) = panel
            route = (student.key, job.annotator_spec["threshold"])
            finished = await self.run_stream(job_id, student) and await self.run_stream(job_id, llm, route=route)
        else:
            finished = all(await asyncio.gather(*(self.run_stream(job_id, labeller) for _, labeller in panel)))
        if len(panel) > 1 and (finished or await asyncio.to_thread(self.store.jobs.state, job_id) == "cancelled"):
            await asyncio.to_thread(self.aggregate, job_id)  # a cancelled job's labelled documents get theirs too
        if finished:
            await asyncio.to_thread(self.store.jobs.set_status, job_id, "succeeded", only_if_active=True)

    def untuned(self, labeller: Annotator) -> bool:
        """Whether prompt tuning could choose this LLM annotator's prompt and has not yet (``Settings.auto_tune``)."""
        return (isinstance(labeller, Labeller) and not labeller.taxonomy.multi_label and labeller.shortlister is None
                and labeller.demonstrator is None
                and self.store.taxonomies.tuned_prompt(labeller.taxonomy.name, labeller.taxonomy_version, labeller.model) is None)

    async def _tune_first(self, job: dict) -> None:
        """Tune the prompt on the job's own documents (no labels), then give the job the tuned annotators.

        A failed tuning is logged and the job labels with the prompt it was submitted with.
        """
        job_id = job.job_id
        tuned = await asyncio.to_thread(self.store.taxonomies.tuned_prompt, job.taxonomy, job.taxonomy_version,
                                        job.model)
        texts = [] if tuned else [t for t in await asyncio.to_thread(self.store.jobs.sample_texts, job_id, AUTO_TUNE_DOCUMENTS)
                                  if t.strip()]
        if len(texts) >= AUTO_TUNE_MIN_DOCUMENTS:  # none when another job (or a person) has tuned since
            try:
                chosen = await tune(self, job.taxonomy, job.taxonomy_version, job.model, texts,
                                    [None] * len(texts))
                log.info("prompt tuned on the job's documents", extra={"job_id": job_id, "prompt": chosen["prompt"],
                                                                       "calibration": chosen["calibration"]})
            except Exception:
                log.warning("prompt tuning failed; the job labels untuned", exc_info=True, extra={"job_id": job_id})
        entries = [{k: v for k, v in member.entry().items() if k in ("kind", "model", "prompt", "weight")}
                   for member in job.annotators]
        panel = await asyncio.to_thread(self.panel, job.taxonomy, job.taxonomy_version, job.model, entries,
                                        job.long_documents, job.shortlist, job.created_at)
        await asyncio.to_thread(self._rekey, job, panel)  # named anew: the names say the tuned prompt

    def _rekey(self, job: Job, panel: list[tuple[dict, Annotator]]) -> bool:
        """Record ``panel`` as the job's annotators (its spec without the auto-tune mark); False once it has labels."""
        spec = job.annotator_spec
        record = job_record(panel, aggregation=spec.get("aggregation"), threshold=spec.get("threshold"))
        return self.store.jobs.rekey(job.job_id, annotator=record["annotator"],
                                    annotator_spec=record["annotator_spec"], annotators=record["annotators"])

    def _job_panel(self, job: Job) -> list[tuple[dict, Annotator]]:
        """Rebuild a stored job's annotators; refuse when the service would now label differently.

        A job that has labelled nothing yet takes the new annotators instead (a tuning of its
        taxonomy landed while it was queued): nothing it wrote was made under the old key.
        """
        stored = [member.entry() for member in job.annotators] or [{"name": "llm", "annotator": job.annotator, "kind": "llm"}]
        panel = self.panel(job.taxonomy, job.taxonomy_version, job.model, stored, job.long_documents,
                           job.shortlist, job.created_at)
        changed = any(row["annotator"] != before["annotator"] for (row, _), before in zip(panel, stored))
        if changed and job.annotators and job.batch is None and self._rekey(job, panel):
            return panel
        for (row, _), before in zip(panel, stored):
            if row["annotator"] != before["annotator"]:
                raise RuntimeError(
                    f"job {job.job_id} was submitted for annotator {before['name']} = {before['annotator']} but this "
                    f"service would run {row['annotator']}: engine or prompt changed since; resubmit the job")
        return panel

    def aggregate(self, job_id: str, method: str | None = None) -> str:
        """(Re)compute a several-annotator job's labels with a method (default: the job's); returns the method."""
        job = self.store.jobs.get(job_id)
        if len(job.annotators) < 2:
            raise Conflict(f"job {job_id} has one annotator; its labels are that annotator's, nothing to aggregate")
        method = method or job.annotator_spec["aggregation"]
        if (method == CASCADE) != (job.annotator_spec["aggregation"] == CASCADE):
            raise Conflict(f"job {job_id} is {'' if method == CASCADE else 'not '}a cascade; its labels are "
                           f"aggregated by {job.annotator_spec['aggregation']}")
        if method == CASCADE:
            student, llm = (a.annotator for a in job.annotators)
            self.store.annotations.merge_cascade(job_id, job.annotator, student, llm, job.annotator_spec["threshold"])
            return method
        taxonomy = self.store.taxonomies.get(job.taxonomy, job.taxonomy_version).taxonomy
        version = job.taxonomy_version
        rows = self.store.annotations.member_rows(job_id)
        weights = {a.annotator: a.weight for a in job.annotators}
        llms = frozenset(a.annotator for a in job.annotators if a.kind == "llm")
        decided = aggregate(rows, taxonomy, tuple(taxonomy.label_names()), weights=weights, calibrated=llms,
                            method="calibrated_mean" if method == REFINED else method)
        refinement = None
        if method == REFINED:  # reads every text and embeds it: the slow part of aggregating a large job
            documents = self.store.quality.documents_with_gold(job_id, DOCUMENT_CHARS)  # what embed_documents reads
            decided, refinement = refined_annotations(decided, documents, taxonomy, shared_embedder().embed_documents)
        hashes = {r["doc_id"]: r["text_hash"] for r in rows}
        keys = dict(job_id=job_id, annotator=job.annotator, model=None, engine="aggregate", prompt_hash=None,
                    taxonomy_version=version, decoding=json.dumps({"method": method, "members": sorted(weights)}))
        self.store.annotations.replace_aggregate(job_id, job.annotator, [
            annotation_row(annotation, doc_id=doc_id, text_hash=hashes[doc_id], cached=False, latency_ms=0.0, **keys)
            for doc_id, annotation in decided.items()], method=method,
            refinement=refinement.as_dict() if refinement else None)
        return method

    async def run_stream(self, job_id: str, labeller: Annotator, route: tuple[str, float] | None = None) -> bool:
        """Label the job's stored documents batch by batch; False if it stopped being active first.

        With ``route`` (annotator, threshold) only documents that annotator was unsure of
        (confidence under the threshold, abstained or failed) are labelled: a cascade's LLM step.
        """
        scorer = self.scorer(labeller)
        position = 0  # every batch is committed whole, so later pending documents lie after it
        while await asyncio.to_thread(self.store.jobs.state, job_id) == "running":
            pending = await asyncio.to_thread(
                self.store.jobs.pending_documents, job_id, labeller.key, self.batch_size, position, route)
            if not pending:
                return True
            position = pending[-1][0] + 1
            rows = await self._label_batch(job_id, labeller, scorer, [p[1:] for p in pending])
            await asyncio.to_thread(self.store.annotations.write, rows)
        return False

    async def _label_batch(self, job_id: str, labeller: Annotator, scorer: Scorer,
                           pending: list[tuple[str, str, str]]) -> list[dict]:
        """Annotation rows for one batch: cache hits, fresh scores, and failures."""
        cached = await asyncio.to_thread(self.store.annotations.cached, labeller.key, [h for _, _, h in pending])
        fresh = [(doc_id, text, h) for doc_id, text, h in pending if h not in cached]
        started = time.perf_counter()
        outcomes = await annotate_texts(labeller, [text for _, text, _ in fresh], scorer)
        per_doc_ms = 1000 * (time.perf_counter() - started) / max(len(fresh), 1)
        keys = annotation_keys(job_id, labeller)
        rows = [annotation_row(cached[h], doc_id=doc_id, text_hash=h, cached=True, latency_ms=0.0, **keys)
                for doc_id, _, h in pending if h in cached]
        rows += [annotation_row(outcome, doc_id=doc_id, text_hash=h, cached=False, latency_ms=per_doc_ms, **keys)
                 for (doc_id, _, h), outcome in zip(fresh, outcomes)]
        return rows


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
               threshold: float | None = None, auto_tune: bool = False) -> dict:
    """The store fields that say who labels a job: version, output annotator, spec and the annotators' rows.

    ``auto_tune``: the job tunes its prompt on its own documents before labelling (``JobRunner.run``).
    """
    spec = _panel_spec(panel, aggregation, threshold) | ({AUTO_TUNE: True} if auto_tune else {})
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


def annotation_keys(job_id: str, labeller: Labeller) -> dict:
    """The columns that identify who made an annotation, shared by every row of a job."""
    spec = labeller.spec
    return dict(job_id=job_id, annotator=labeller.key, model=spec["model"], engine=spec["engine"],
                prompt_hash=spec["prompt_hash"], taxonomy_version=spec["taxonomy_version"],
                decoding=json.dumps(spec["decoding"], sort_keys=True))
