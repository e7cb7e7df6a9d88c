"""Routes of labelling jobs: submit, list, read, cancel, and their labels and failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.auth import READ, WRITE, caller_of
from service.api.context import built, hosted, sent_once
from service.api.schemas import (
    JobCreated,
    JobStatus,
)
from service.api.security import OPERATOR
from service.errors import (
    Conflict,
)
from service.store import Store
from service.store.jobs import JobSummary
from service.vocabulary import LabelsFormat
from service.work.submission import JobRequest, submit_job

router = APIRouter(tags=["jobs"])

@router.post("/v1/jobs", dependencies=[WRITE], status_code=202, response_model=JobCreated)
async def create_job(request: Request, body: JobRequest) -> JSONResponse:
    """Validate and store a job's documents, queue it, answer 202 with its id."""
    ctx, caller = hosted(request), caller_of(request)
    limited = caller.token_id not in (None, OPERATOR)  # the operator's token and loopback use have no job limit
    submitted = await submit_job(ctx.runner, ctx.settings, body, owner=caller.token_id, limited=limited)
    created = JobCreated(status="queued", **asdict(submitted))
    return JSONResponse(created.model_dump(), status_code=202)


@router.get("/v1/jobs", dependencies=[READ])
async def list_jobs(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> list[JobSummary]:
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
async def job_labels(request: Request, job_id: str, format: LabelsFormat = Query("jsonl")):
    """A job's labels in input order: streamed JSONL, or a Parquet file."""
    ctx = hosted(request)
    await asyncio.to_thread(ctx.store.jobs.state, job_id)  # 404 before the stream starts
    if format == "parquet":
        path = await built(ctx.settings.download_dir, ".parquet", lambda out: _write_parquet(ctx.store, job_id, out))
        return sent_once(path, "application/vnd.apache.parquet", f"{job_id}.parquet")
    return StreamingResponse(_jsonl(ctx.store, job_id), media_type="application/x-ndjson")


def _jsonl(store: Store, job_id: str) -> Iterator[bytes]:
    """Label rows as JSON lines, one Arrow batch at a time."""
    for batch in store.annotations.label_reader(job_id):
        for row in batch.to_pylist():
            row["distribution"] = dict(row["distribution"])
            yield (json.dumps(row) + "\n").encode()


def _write_parquet(store: Store, job_id: str, path: Path) -> None:
    """Write a job's labels to a Parquet file, one Arrow batch at a time."""
    reader = store.annotations.label_reader(job_id)
    with pq.ParquetWriter(path, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)


@router.get("/v1/jobs/{job_id}/failures", dependencies=[READ])
async def job_failures(request: Request, job_id: str) -> list[dict]:
    """Documents of a job that failed, with their errors."""
    store = hosted(request).store
    await asyncio.to_thread(store.jobs.state, job_id)
    return await asyncio.to_thread(store.annotations.failures, job_id)
