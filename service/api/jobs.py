"""Routes of labelling jobs: submit, list, read, cancel, and their labels and failures."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import pyarrow.parquet as pq
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from service.api.auth import READ, WRITE, caller_of
from service.api.context import SUBMITTING, Context, hosted
from service.api.schemas import (
    JobCreated,
    JobRequest,
    JobStatus,
)
from service.api.security import OPERATOR, Caller
from service.documents import CHARS_SETTING, batched, check_document, local_source, read_file
from service.errors import (
    Conflict,
    InvalidInput,
    PayloadTooLarge,
    TooManyRequests,
)
from service.files import atomic_path
from service.labelling.aggregation import DEFAULT_PANEL_AGGREGATION
from service.labelling.annotators import EMBEDDING, EmbeddingLabeller
from service.labelling.labeller import Labeller
from service.settings import Settings
from service.store import Store
from service.store.jobs import document_batch
from service.taxonomy import Taxonomy
from service.work.jobs import CASCADE, job_record

router = APIRouter(tags=["jobs"])

def _default_panel(ctx: Context, body: JobRequest) -> bool:
    """Whether a job that names no annotators gets the default panel (ANNOTATE_DEFAULT_ANNOTATORS).

    The LLM and the embedding annotator, measured together (benchmarks/zero_shot.py) against
    the LLM alone: the embedding annotator is the stronger zero-shot annotator on TREC, the
    speeches and news, and calibrated_mean keeps an LLM that gives every document the same
    label from outvoting it; 'refined' then fits the job (service.labelling.refinement). The embedding
    annotator labels single-label taxonomies in stream jobs only and never says "none of
    these", so multi-label taxonomies, taxonomies that allow "none of these" (its vote would
    outweigh the LLM's abstention) and batch jobs keep the LLM alone.
    """
    if ctx.settings.default_annotators != "llm+embedding" or body.mode != "stream":
        return False
    taxonomy = ctx.store.taxonomies.get(body.taxonomy, body.taxonomy_version).taxonomy
    return not taxonomy.multi_label and not taxonomy.abstention.allow_none


@router.post("/v1/jobs", dependencies=[WRITE], status_code=202, response_model=JobCreated)
async def create_job(request: Request, body: JobRequest) -> JSONResponse:
    """Validate and store a job's documents, queue it, answer 202 with its id."""
    ctx = hosted(request)
    annotators = None if body.annotators is None else [a.model_dump() for a in body.annotators]
    aggregation = body.aggregation
    if body.classifier is not None:
        annotators, aggregation = [{"kind": "classifier", "classifier": body.classifier}, {"kind": "llm"}], CASCADE
    default_panel = annotators is None and await asyncio.to_thread(_default_panel, ctx, body)
    if default_panel:
        annotators = [{"kind": "llm"}, {"kind": EMBEDDING}]
        aggregation = aggregation if "aggregation" in body.model_fields_set else DEFAULT_PANEL_AGGREGATION
    shortlist = None if body.shortlist is None else body.shortlist.model_dump()
    panel = await asyncio.to_thread(ctx.runner.panel, body.taxonomy, body.taxonomy_version, body.model, annotators,
                                    body.long_documents, shortlist)
    labeller = panel[0][1]
    auto_tune = default_panel and ctx.settings.auto_tune and await asyncio.to_thread(ctx.runner.untuned, labeller)
    if body.mode == "batch" and getattr(labeller, "shortlister", None) is not None:
        raise InvalidInput("shortlisted labelling (the job's or the taxonomy's 'shortlist') runs in mode 'stream' only: "
                           "the retriever lives in the service")
    if body.mode == "batch" and getattr(labeller, "demonstrator", None) is not None:
        raise InvalidInput(f"taxonomy {body.taxonomy!r} sets 'demonstrations', which run in mode 'stream' only: the "
                           "demonstrations' pool and its embeddings live in the service")
    if body.mode == "batch" and (len(panel) > 1 or isinstance(labeller, EmbeddingLabeller)):
        raise InvalidInput("mode 'batch' runs one LLM annotator; label with several annotators in mode 'stream'")
    if body.mode == "batch" and labeller.long_documents == "reject":
        raise InvalidInput(f"{_who_says(body, labeller.taxonomy)} long_documents: reject, which mode 'stream' checks at "
                           "submission; in mode 'batch' choose truncate, head_tail or chunk (the job's "
                           "'long_documents' overrides the taxonomy's)")
    caller = caller_of(request)
    if caller.token_id in (None, OPERATOR):  # the operator's token and loopback use have no job limit
        return await _create(ctx, body, panel, labeller, aggregation, caller, auto_tune)
    async with SUBMITTING[caller.token_id]:  # one submission per token at a time: the limit's count stays true
        await asyncio.to_thread(_check_job_limit, ctx, caller)
        return await _create(ctx, body, panel, labeller, aggregation, caller, auto_tune)


async def _create(ctx: Context, body: JobRequest, panel: list, labeller, aggregation: str | None,
                  caller: Caller, auto_tune: bool = False) -> JSONResponse:
    """Store the job's documents (or shard plan), queue it and answer 202."""
    job_id = "job_" + uuid.uuid4().hex[:16]
    llm = next((labeller.model for _, labeller in panel if isinstance(labeller, Labeller)), None)
    model = llm or ctx.runner.model(body.model).name
    job = dict(job_id=job_id, taxonomy=body.taxonomy, model=model, created_by=caller.token_id,
               long_documents=body.long_documents,
               shortlist=None if body.shortlist is None else body.shortlist.model_dump(),
               **job_record(panel, aggregation=aggregation, threshold=body.cascade_threshold, auto_tune=auto_tune))
    if body.mode == "batch":
        shards, stamp = await asyncio.to_thread(ctx.runner.batch_runner.plan, body.source, body.shard_size)
        batch = {"source": body.source, "text_field": body.text_field, "id_field": body.id_field, "stamp": stamp}
        total = await asyncio.to_thread(ctx.store.jobs.create, **job, batch=batch, shards=shards)
    else:
        max_chars, limit_name = _longest(ctx.settings, body, labeller.taxonomy)
        rows = _job_rows(ctx.settings, body, max_chars)
        batches = (document_batch(job_id, batch, i * ctx.settings.batch_size)
                   for i, batch in enumerate(batched(rows, ctx.settings.batch_size)))
        try:
            total = await asyncio.to_thread(ctx.store.jobs.create, **job, batches=batches)
        except PayloadTooLarge as exc:
            raise PayloadTooLarge(str(exc).replace(CHARS_SETTING, limit_name)) from exc
    ctx.runner.submit(job_id)
    created = JobCreated(job_id=job_id, status="queued", total=total, taxonomy_version=labeller.taxonomy_version,
                         model=model, mode=body.mode, annotators=[row["name"] for row, _ in panel])
    return JSONResponse(created.model_dump(), status_code=202)


def _check_job_limit(ctx: Context, caller: Caller) -> None:
    """A token may have so many jobs queued or running at once."""
    active, limit = ctx.store.jobs.active_of(caller.token_id), ctx.settings.max_active_jobs_per_token
    if active >= limit:
        raise TooManyRequests(f"token {caller.token_id} has {active} jobs queued or running, the limit "
                              f"(ANNOTATE_MAX_ACTIVE_JOBS_PER_TOKEN) is {limit}; wait for one to end or cancel one")


def _longest(settings: Settings, body: JobRequest, taxonomy: Taxonomy) -> tuple[int, str]:
    """The longest document a job accepts, and the setting that says so, for its error message."""
    rejecting = (body.long_documents or taxonomy.long_documents) == "reject"
    if rejecting and settings.model_input_chars < settings.max_document_chars:
        return settings.model_input_chars, (f"the model's input, ANNOTATE_MODEL_INPUT_CHARS; "
                                            f"{_who_says(body, taxonomy)} long_documents: reject")
    return settings.max_document_chars, CHARS_SETTING


def _who_says(body: JobRequest, taxonomy: Taxonomy) -> str:
    """Whose long_documents a job follows, for messages: the job's own, or its taxonomy's."""
    return "the job says" if body.long_documents else f"taxonomy {taxonomy.name!r} says"


def _job_rows(settings: Settings, body: JobRequest, max_chars: int) -> Iterator[dict]:
    """Validated document rows from the inline list or the server-side source file."""
    if body.source is not None:
        path = local_source(settings.input_dir, body.source)
        rows = read_file(path, text_field=body.text_field, id_field=body.id_field, max_chars=max_chars,
                         name=body.source)
        first = next(rows, None)
        if first is None:
            raise InvalidInput(f"source {body.source!r} holds no documents")
        return chain([first], rows)
    if len(body.documents) > settings.max_documents_per_job:
        raise PayloadTooLarge(f"documents: {len(body.documents):,} documents is over the limit of "
                              f"{settings.max_documents_per_job:,} per job (ANNOTATE_MAX_DOCUMENTS_PER_JOB)")
    return (check_document(f"documents[{i}]", d.id if d.id is not None else i, d.text, d.meta, max_chars=max_chars)
            for i, d in enumerate(body.documents))


@router.get("/v1/jobs", dependencies=[READ])
async def list_jobs(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> list[dict]:
    """The most recent jobs."""
    return await asyncio.to_thread(hosted(request).store.jobs.recent, limit)


@router.get("/v1/jobs/{job_id}", dependencies=[READ], response_model=JobStatus)
async def get_job(request: Request, job_id: str) -> JobStatus:
    """A job's status and progress counts."""
    return JobStatus.from_job(await asyncio.to_thread(hosted(request).store.jobs.get, job_id))


@router.delete("/v1/jobs/{job_id}", dependencies=[WRITE], response_model=JobStatus)
async def cancel_job(request: Request, job_id: str) -> JobStatus:
    """Cancel a queued or running job; finished work stays in the store."""
    store = hosted(request).store
    if not await asyncio.to_thread(store.jobs.set_status, job_id, "cancelled", only_if_active=True):
        job = await asyncio.to_thread(store.jobs.get, job_id)
        raise Conflict(f"job {job_id} already ended with status {job.status!r}; nothing to cancel")
    return JobStatus.from_job(await asyncio.to_thread(store.jobs.get, job_id))


@router.get("/v1/jobs/{job_id}/labels", dependencies=[READ])
async def job_labels(request: Request, job_id: str, format: str = Query("jsonl", pattern="^(jsonl|parquet)$")):
    """A job's labels in input order: streamed JSONL, or a Parquet file."""
    ctx = hosted(request)
    await asyncio.to_thread(ctx.store.jobs.get, job_id)
    if format == "parquet":
        path = await asyncio.to_thread(_write_parquet, ctx, job_id)
        return FileResponse(path, media_type="application/vnd.apache.parquet", filename=f"{job_id}.parquet")
    return StreamingResponse(_jsonl(ctx.store, job_id), media_type="application/x-ndjson")


def _jsonl(store: Store, job_id: str) -> Iterator[bytes]:
    """Label rows as JSON lines, one Arrow batch at a time."""
    for batch in store.annotations.label_reader(job_id):
        for row in batch.to_pylist():
            row["distribution"] = dict(row["distribution"])
            yield (json.dumps(row) + "\n").encode()


def _write_parquet(ctx: Context, job_id: str) -> Path:
    """Write a job's labels to the exports dir (readable from SQL with read_parquet) and return the path."""
    path = ctx.settings.export_dir / f"{job_id}.labels.parquet"
    reader = ctx.store.annotations.label_reader(job_id)
    with atomic_path(path) as partial, pq.ParquetWriter(partial, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
    return path


@router.get("/v1/jobs/{job_id}/failures", dependencies=[READ])
async def job_failures(request: Request, job_id: str) -> list[dict]:
    """Documents of a job that failed, with their errors."""
    store = hosted(request).store
    await asyncio.to_thread(store.jobs.get, job_id)
    return await asyncio.to_thread(store.annotations.failures, job_id)
