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
from functools import partial
from pathlib import Path

from service.engines.embeddings import DOCUMENT_CHARS
from service.errors import Conflict
from service.labelling.aggregation import REFINED, aggregate, silent
from service.labelling.refinement import refined_annotations
from service.labelling.scoring import Annotator, Scorer, annotate_texts
from service.labelling.tuning import tune
from service.store import Store
from service.store.annotations import annotation_row
from service.store.jobs import Job
from service.work.panels import AUTO_TUNE, CASCADE, DEFAULT_PANEL, Model, Panels, annotation_keys, job_record, requested
from service.work.tasks import Tasks

log = logging.getLogger(__name__)

AUTO_TUNE_DOCUMENTS = 100  # the job's documents a tuning labels with every candidate
AUTO_TUNE_MIN_DOCUMENTS = 20  # fewer say too little to choose a prompt for every later job of the taxonomy


class JobRunner:
    """Runs queued jobs with a small pool of workers; one instance per store.

    Jobs stream through ``run_stream`` batch by batch; jobs created with a ``batch``
    plan (large server-side corpora) go to ``batch_runner`` (Ray Data, ``service.work.batch``).
    """

    def __init__(self, store: Store, models: dict[str, Model], default_model: str, *, batch_size: int,
                 model_input_chars: int, workers: int = 1, batch_runner=None, students=None,
                 max_scored_labels: int = 100, embedding_model_dir: Path | None = None):
        self.store = store
        self.panels = Panels(store, models, default_model, model_input_chars=model_input_chars, students=students,
                             max_scored_labels=max_scored_labels, embedding_model_dir=embedding_model_dir)
        self.batch_size = batch_size
        self.batch_runner = batch_runner
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers = Tasks()
        for _ in range(workers):
            self._workers.start(self._work())

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
            finished = all(await asyncio.gather(*(self.run_stream(job_id, labeller) for row, labeller in panel
                                                  if not silent(row["weight"]))))
        if len(panel) > 1 and (finished or await asyncio.to_thread(self.store.jobs.state, job_id) == "cancelled"):
            await asyncio.to_thread(self.aggregate, job_id)  # a cancelled job's labelled documents get theirs too
        if finished:
            await asyncio.to_thread(self.store.jobs.set_status, job_id, "succeeded", only_if_active=True)

    async def _tune_first(self, job: Job) -> None:
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
                chosen = await tune(self.panels, job.taxonomy, job.taxonomy_version, job.model, texts,
                                    [None] * len(texts))
                log.info("prompt tuned on the job's documents", extra={"job_id": job_id, "prompt": chosen["prompt"],
                                                                       "calibration": chosen["calibration"]})
            except Exception:
                log.warning("prompt tuning failed; the job labels untuned", exc_info=True, extra={"job_id": job_id})
        entries = [{k: v for k, v in requested(member.entry()).items() if k in ("kind", "model", "prompt", "weight")}
                   for member in job.annotators]
        panel = await asyncio.to_thread(partial(self.panels.panel, job.taxonomy, job.taxonomy_version, job.model,
                                                entries, job.long_documents, job.shortlist, job.created_at,
                                                default=True))  # only the default panel tunes itself
        await asyncio.to_thread(self._rekey, job, panel)  # named anew: the names say the tuned prompt

    def _rekey(self, job: Job, panel: list[tuple[dict, Annotator]]) -> bool:
        """Record ``panel`` as the job's annotators (its spec without the auto-tune mark); False once it has labels."""
        spec = job.annotator_spec
        record = job_record(panel, aggregation=spec.get("aggregation"), threshold=spec.get("threshold"),
                            default=bool(spec.get(DEFAULT_PANEL)))
        return self.store.jobs.rekey(job.job_id, annotator=record["annotator"],
                                    annotator_spec=record["annotator_spec"], annotators=record["annotators"])

    def _job_panel(self, job: Job) -> list[tuple[dict, Annotator]]:
        """Rebuild a stored job's annotators; refuse when the service would now label differently.

        A job that has labelled nothing yet takes the new annotators instead (a tuning of its
        taxonomy landed while it was queued): nothing it wrote was made under the old key, and a
        default panel weighs its LLM as the new tuning says. A job with labels keeps its weights.
        """
        stored = [member.entry() for member in job.annotators] or [{"name": "llm", "annotator": job.annotator,
                                                                     "kind": "llm", "weight": None}]
        panel = self.panels.panel(job.taxonomy, job.taxonomy_version, job.model, [requested(e) for e in stored],
                                  job.long_documents, job.shortlist, job.created_at,
                                  default=bool(job.annotator_spec.get(DEFAULT_PANEL)))
        changed = any((row["annotator"], row["weight"]) != (before["annotator"], before["weight"])
                      for (row, _), before in zip(panel, stored))
        if changed and job.annotators and job.batch is None and self._rekey(job, panel):
            return panel
        for (row, _), before in zip(panel, stored):
            if row["annotator"] != before["annotator"]:
                raise RuntimeError(
                    f"job {job.job_id} was submitted for annotator {before['name']} = {before['annotator']} but this "
                    f"service would run {row['annotator']}: engine, prompt, tuning or encoder (ANNOTATE_EMBEDDING_MODEL_DIR) "
                    "changed since; resubmit the job")
            row["weight"] = before["weight"]
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
        decided = aggregate(rows, taxonomy, tuple(taxonomy.label_names()), weights=weights, calibrated=batch_calibrated(job),
                            method="calibrated_mean" if method == REFINED else method)
        refinement = None
        if method == REFINED:  # the LLM reads every text (the first time): the slow part
            documents = self.store.quality.documents_with_gold(job_id, DOCUMENT_CHARS)  # what embed_documents reads
            decided, refinement = refined_annotations(decided, documents, taxonomy, self.panels.document_vectors(),
                                                      self.panels.reader(job))
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
        scorer = self.panels.scorer(labeller)
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


def batch_calibrated(job: Job) -> frozenset[str]:
    """The LLM members ``calibrated_mean`` batch-calibrates: those whose prompt no tuning chose (a tuning already
    chose the others' calibration, and calibrating them again measured worse: docs/labelling.md)."""
    tuned = {member["annotator"] for member in job.annotator_spec.get("members", []) if "tuning" in member}
    return frozenset(a.annotator for a in job.annotators if a.kind == "llm" and a.annotator not in tuned)
