"""The HTTP API (FastAPI): validates requests at the boundary, then calls the store and runner.

Every error leaves in one shape, ``{"error": {"type", "message", ...}}``, with the status
its ``AnnotateError`` class names. The OpenAPI schema is published at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import pyarrow.parquet as pq
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from service import __version__
from service.api.auth import AUTH_ROUTES, caller_of, guard, route_scopes
from service.api.classifiers import CLASSIFIER_ROUTES
from service.api.context import Context, hosted, read_upload
from service.api.quality import QUALITY_ROUTES
from service.api.schemas import (
    InductionRequest,
    InductionStatus,
    JobCreated,
    JobRequest,
    JobStatus,
    SqlRequest,
    SqlResponse,
    TaxonomyCreated,
    TuneRequest,
)
from service.api.security import OPERATOR, Caller
from service.console.pages import CONSOLE_ROUTES
from service.documents import CHARS_SETTING, batched, check_document, local_source, read_file
from service.errors import (
    AnnotateError,
    Conflict,
    EngineUnavailable,
    InvalidInput,
    PayloadTooLarge,
    TaxonomyError,
    TooManyRequests,
)
from service.files import atomic_path
from service.induction.inducer import InductionOptions, sample_texts
from service.labelling.aggregation import DEFAULT_PANEL_AGGREGATION
from service.labelling.annotators import EMBEDDING, EmbeddingLabeller
from service.labelling.labeller import Labeller
from service.labelling.prompts import template_names
from service.labelling.tuning import tune
from service.settings import Settings
from service.store.database import Store, document_batch
from service.store.sandbox import SqlResult, run_sql
from service.taxonomy import Taxonomy, format_loc, parse_taxonomy
from service.work.jobs import CASCADE, job_record

_SUBMITTING: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # per token (one ingress replica)
_TUNING: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # per token: one prompt tuning at a time
_SQL_RUNNING: Counter[str | None] = Counter()  # token id -> its user SQL queries admitted and not yet ended
_SQL_RUNNING_LOCK = threading.Lock()  # slots are released on SQL threads
_SQL_SPARE_THREADS = 2  # shared SQL threads beyond one token's limit


def create_api() -> FastAPI:
    """Build the FastAPI application with its routes and error handlers."""
    app = FastAPI(title="annotate", version=__version__, description="LLM-driven annotation service")
    app.exception_handler(AnnotateError)(_render_error)
    app.exception_handler(RequestValidationError)(_render_validation_error)
    routes = ROUTES + QUALITY_ROUTES + CLASSIFIER_ROUTES + CONSOLE_ROUTES + AUTH_ROUTES
    for route in routes:
        app.add_api_route(**{k: v for k, v in route.items() if k != "scope"})
    app.middleware("http")(guard(app, route_scopes(routes), _render_error))
    app.add_middleware(BodyLimit)  # added last, so it runs first: no body is read before its size is known
    return app


class BodyLimit:
    """Refuse request bodies over ``ANNOTATE_MAX_BODY_BYTES``, counted as they stream in.

    ``Content-Length`` is checked before anything is read; a chunked body (no length) is
    counted chunk by chunk, and the request is answered 413 as soon as it passes the limit,
    whatever the route was doing with it (the route's own answer to a cut body is dropped).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        try:
            limit = hosted(request).settings.max_body_bytes
        except EngineUnavailable:  # still starting: the routes answer 503
            return await self.app(scope, receive, send)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return await _too_large(request, f"request body of {int(length):,} bytes", limit)(scope, receive, send)
        received, over, started = 0, False, False

        async def counted_receive():
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                over = True
                raise PayloadTooLarge(f"request body over the limit of {limit:,} bytes")
            return message

        async def held_send(message):
            nonlocal started
            if not over:
                started = True
                await send(message)

        try:
            await self.app(scope, counted_receive, held_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _too_large(request, f"request body of more than {received:,} bytes", limit)(scope, receive, send)


def _too_large(request: Request, what: str, limit: int) -> JSONResponse:
    """The 413 of a body over the limit, naming the setting."""
    return _render_error(request, PayloadTooLarge(f"{what} is over the limit of {limit:,} (ANNOTATE_MAX_BODY_BYTES); "
                                                  "use a server-side 'source' file"))


def _render_error(request: Request, exc: AnnotateError) -> JSONResponse:
    """One body shape for every error the service raises."""
    body: dict = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, TaxonomyError):
        body["problems"] = [{"location": loc, "line": line, "message": msg} for loc, line, msg in exc.problems]
    return JSONResponse({"error": body}, status_code=exc.status_code)


def _render_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic request errors in the same shape, each naming its field path."""
    problems = []
    for error in exc.errors():
        location = format_loc(error["loc"][1:])
        problems.append({"location": location or "body", "message": error["msg"]})
    message = "; ".join(f"{p['location']}: {p['message']}" for p in problems)
    body = {"type": "InvalidInput", "message": message, "problems": problems}
    return JSONResponse({"error": body}, status_code=422)


async def health(request: Request) -> dict:
    """Liveness plus what engine the service labels with."""
    runner = hosted(request).runner
    default = runner.models[runner.default_model].info
    return {"status": "ok", "version": __version__, "engine": default.engine, "model": default.model,
            "default_model": runner.default_model}


async def list_models(request: Request) -> list[dict]:
    """Every configured model with its engine and the live queue depth and throughput of its replicas."""
    ctx = hosted(request)
    reports = await asyncio.gather(*(handle.report.remote() for handle in ctx.models.values()),
                                   return_exceptions=True)
    return [{"name": name, "engine": model.info.engine, "model": model.info.model, "decoding": model.info.decoding,
             "default": name == ctx.runner.default_model,
             "stats": None if isinstance(report, BaseException) else report}
            for (name, model), report in zip(ctx.runner.models.items(), reports)]


async def list_prompts(request: Request) -> list[str]:
    """The prompt templates a job's LLM annotators may name (the registry; names, never paths)."""
    return sorted(template_names())


async def push_taxonomy(request: Request) -> JSONResponse:
    """Store a taxonomy from its YAML body; a changed file becomes a new version."""
    raw = await read_upload(request, "taxonomy YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaxonomyError("<request body>", [("", None, f"not valid UTF-8 at byte {exc.start}")]) from exc
    taxonomy = await asyncio.to_thread(parse_taxonomy, text, source="<request body>")  # the loop serves others
    _check_taxonomy_size(taxonomy, hosted(request).settings)
    version, created = await asyncio.to_thread(hosted(request).store.put_taxonomy, taxonomy, text)
    body = TaxonomyCreated(name=taxonomy.name, version=version, created=created)
    return JSONResponse(body.model_dump(), status_code=201)  # "created" says whether the version is new


def _check_taxonomy_size(taxonomy: Taxonomy, settings: Settings) -> None:
    """Refuse a taxonomy whose labels or text are over the service's limits (each prompt would carry them)."""
    if len(taxonomy.labels) > settings.taxonomy_max_labels:
        raise PayloadTooLarge(f"taxonomy {taxonomy.name!r} has {len(taxonomy.labels):,} labels, over the limit of "
                              f"{settings.taxonomy_max_labels:,} (ANNOTATE_TAXONOMY_MAX_LABELS)")
    if (chars := taxonomy.text_chars()) > settings.taxonomy_max_chars:
        raise PayloadTooLarge(f"taxonomy {taxonomy.name!r} has {chars:,} characters of instruction, descriptions and "
                              f"examples, over the limit of {settings.taxonomy_max_chars:,} (ANNOTATE_TAXONOMY_MAX_CHARS)")


async def list_taxonomies(request: Request) -> list[dict]:
    """Every stored taxonomy version."""
    return await asyncio.to_thread(hosted(request).store.list_taxonomies)


async def get_taxonomy(request: Request, name: str, version: str | None = None) -> dict:
    """One taxonomy (newest version unless ``version``), with its YAML, all versions and its prompt tunings."""
    store = hosted(request).store
    taxonomy, found, yaml_text = await asyncio.to_thread(store.get_taxonomy, name, version)
    versions = await asyncio.to_thread(store.taxonomy_versions, name)
    tunings = await asyncio.to_thread(store.prompt_tunings, name, found)
    return {"name": name, "version": found, "yaml": yaml_text, "taxonomy": taxonomy.model_dump(), "versions": versions,
            "tunings": tunings}


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
    taxonomy, _, _ = ctx.store.get_taxonomy(body.taxonomy, body.taxonomy_version)
    return not taxonomy.multi_label and not taxonomy.abstention.allow_none


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
    async with _SUBMITTING[caller.token_id]:  # one submission per token at a time: the limit's count stays true
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
        total = await asyncio.to_thread(ctx.store.create_job, **job, batch=batch, shards=shards)
    else:
        max_chars, limit_name = _longest(ctx.settings, body, labeller.taxonomy)
        rows = _job_rows(ctx.settings, body, max_chars)
        batches = (document_batch(job_id, batch, i * ctx.settings.batch_size)
                   for i, batch in enumerate(batched(rows, ctx.settings.batch_size)))
        try:
            total = await asyncio.to_thread(ctx.store.create_job, **job, batches=batches)
        except PayloadTooLarge as exc:
            raise PayloadTooLarge(str(exc).replace(CHARS_SETTING, limit_name)) from exc
    ctx.runner.submit(job_id)
    created = JobCreated(job_id=job_id, status="queued", total=total, taxonomy_version=labeller.taxonomy_version,
                         model=model, mode=body.mode, annotators=[row["name"] for row, _ in panel])
    return JSONResponse(created.model_dump(), status_code=202)


def _check_job_limit(ctx: Context, caller: Caller) -> None:
    """A token may have so many jobs queued or running at once."""
    active, limit = ctx.store.active_jobs_of(caller.token_id), ctx.settings.max_active_jobs_per_token
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


async def tune_taxonomy(request: Request, name: str, body: TuneRequest) -> dict:
    """Choose the taxonomy's prompt on a sample (service.labelling.tuning); jobs on it that name no prompt use the choice."""
    ctx, caller = hosted(request), caller_of(request)
    texts = [check_document(f"documents[{i}]", i, d.text, None, max_chars=ctx.settings.max_document_chars)["text"]
             for i, d in enumerate(body.documents)]
    lock = _TUNING[caller.token_id]  # apart from submissions: a tuning takes minutes and must not hold jobs back
    if lock.locked():
        raise TooManyRequests("a prompt tuning of this token is running; wait for its answer before starting another")
    async with lock:
        return await tune(ctx.runner, name, body.taxonomy_version, body.model, texts,
                          [d.label for d in body.documents], body.prompts, body.calibrations)


async def induce_taxonomy(request: Request, body: InductionRequest) -> JSONResponse:
    """Start inducing a taxonomy from a corpus sample; answer 202 with the induction's id."""
    ctx, caller = hosted(request), caller_of(request)
    async with _SUBMITTING[caller.token_id]:  # checked and counted under one lock, as for jobs
        return await _start_induction(ctx, caller, body)


async def _start_induction(ctx: Context, caller: Caller, body: InductionRequest) -> JSONResponse:
    """Check the caller's induction limit, sample the corpus and start the induction."""
    if caller.token_id not in (None, OPERATOR):  # as for jobs: the operator and loopback use have no limit
        active, limit = ctx.inductions.active_of(caller.token_id), ctx.settings.max_active_jobs_per_token
        if active >= limit:
            raise TooManyRequests(f"token {caller.token_id} has {active} inductions running, the limit "
                                  f"(ANNOTATE_MAX_ACTIVE_JOBS_PER_TOKEN) is {limit}; wait for one to end")
    model = ctx.runner.model(body.model).name
    base = (await asyncio.to_thread(ctx.store.get_taxonomy, body.base))[0] if body.base else None
    if body.source is not None:
        rows = read_file(local_source(ctx.settings.input_dir, body.source), text_field=body.text_field, id_field=body.id_field,
                         max_chars=ctx.settings.max_document_chars, name=body.source)
        source = body.source
    else:
        rows = (check_document(f"documents[{i}]", i, d if isinstance(d, str) else d.text, None,
                               max_chars=ctx.settings.max_document_chars) for i, d in enumerate(body.documents))
        source = f"{len(body.documents)} inline documents"
    texts, corpus_size = await asyncio.to_thread(sample_texts, rows, body.sample_size, body.seed)
    texts = [text[: ctx.settings.model_input_chars] for text in texts]  # what the models read of each anyway
    options = InductionOptions(name=body.name, max_labels=body.max_labels,
                               report_size=body.report_size, seed=body.seed, method=body.method,
                               allow_none=body.allow_none)
    induction_id = "ind_" + uuid.uuid4().hex[:16]
    await asyncio.to_thread(ctx.store.create_induction, induction_id, body.name,
                            body.model_dump(exclude={"documents"}) | {"model": model})
    ctx.inductions.submit(induction_id, texts, options, source=source, corpus_size=corpus_size, model=model,
                          base=base, push=body.push, owner=caller.token_id)
    return JSONResponse({"induction_id": induction_id, "status": "queued", "corpus_size": corpus_size,
                         "sample_size": len(texts)}, status_code=202)


async def get_induction(request: Request, induction_id: str) -> InductionStatus:
    """An induction's progress; its YAML and review report once it succeeded."""
    ctx = hosted(request)
    row = await asyncio.to_thread(ctx.store.induction, induction_id)
    if induction_id in ctx.inductions.live:  # running: its progress lives in memory, not in the database
        row.update(status="running", **dict(zip(("stage", "progress"), ctx.inductions.live[induction_id])))
    return InductionStatus(**{k: v for k, v in row.items() if k in InductionStatus.model_fields})


async def list_jobs(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> list[dict]:
    """The most recent jobs."""
    return await asyncio.to_thread(hosted(request).store.list_jobs, limit)


async def get_job(request: Request, job_id: str) -> JobStatus:
    """A job's status and progress counts."""
    return JobStatus.from_row(await asyncio.to_thread(hosted(request).store.job, job_id))


async def cancel_job(request: Request, job_id: str) -> JobStatus:
    """Cancel a queued or running job; finished work stays in the store."""
    store = hosted(request).store
    if not await asyncio.to_thread(store.set_job_status, job_id, "cancelled", only_if_active=True):
        job = await asyncio.to_thread(store.job, job_id)
        raise Conflict(f"job {job_id} already ended with status {job['status']!r}; nothing to cancel")
    return JobStatus.from_row(await asyncio.to_thread(store.job, job_id))


async def job_labels(request: Request, job_id: str, format: str = Query("jsonl", pattern="^(jsonl|parquet)$")):
    """A job's labels in input order: streamed JSONL, or a Parquet file."""
    ctx = hosted(request)
    await asyncio.to_thread(ctx.store.job, job_id)
    if format == "parquet":
        path = await asyncio.to_thread(_write_parquet, ctx, job_id)
        return FileResponse(path, media_type="application/vnd.apache.parquet", filename=f"{job_id}.parquet")
    return StreamingResponse(_jsonl(ctx.store, job_id), media_type="application/x-ndjson")


def _jsonl(store: Store, job_id: str) -> Iterator[bytes]:
    """Label rows as JSON lines, one Arrow batch at a time."""
    for batch in store.label_reader(job_id):
        for row in batch.to_pylist():
            row["distribution"] = dict(row["distribution"])
            yield (json.dumps(row) + "\n").encode()


def _write_parquet(ctx: Context, job_id: str) -> Path:
    """Write a job's labels to the exports dir (readable from SQL with read_parquet) and return the path."""
    path = ctx.settings.export_dir / f"{job_id}.labels.parquet"
    reader = ctx.store.label_reader(job_id)
    with atomic_path(path) as partial, pq.ParquetWriter(partial, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
    return path


async def job_failures(request: Request, job_id: str) -> list[dict]:
    """Documents of a job that failed, with their errors."""
    store = hosted(request).store
    await asyncio.to_thread(store.job, job_id)
    return await asyncio.to_thread(store.failures, job_id)


async def query_sql(request: Request, body: SqlRequest) -> SqlResponse:
    """Run one read-only SQL statement in the sandbox, under limits a request may only lower."""
    ctx = hosted(request)
    settings = ctx.settings
    timeout = min(body.timeout_s or settings.sql_timeout_s, settings.sql_timeout_s)
    max_rows = min(body.max_rows or settings.sql_max_rows, settings.sql_max_rows)
    max_bytes = min(body.max_bytes or settings.sql_max_bytes, settings.sql_max_bytes)
    call = functools.partial(_run_sql_on_thread, ctx.store, body.sql, timeout_s=timeout, max_rows=max_rows,
                             max_bytes=max_bytes)
    future = _submit_sql(caller_of(request), settings.sql_max_concurrent_per_token, call)
    return SqlResponse(**vars(await asyncio.wrap_future(future)))


def _run_sql_on_thread(store: Store, sql: str, **limits) -> SqlResult:
    """The sandbox on a cursor made on the thread that uses it."""
    return run_sql(store.cursor(), sql, **limits)


def _submit_sql(caller: Caller, limit: int, call) -> Future:
    """Start ``call`` on the caller's SQL threads, or TooManyRequests when the caller already runs ``limit`` queries.

    The operator (token id ``OPERATOR``) has ``limit`` threads of its own and may run no more than ``limit``
    queries, so its queries never wait behind any other token's. Every other token (the tokenless loopback
    caller counts as one) shares ``limit + _SQL_SPARE_THREADS`` threads, so one token alone never holds them
    all; none of them takes a thread from jobs. A slot is freed when the query ends, not when the request
    does, so a client that hangs up cannot run more than its limit.
    """
    with _SQL_RUNNING_LOCK:
        running = _SQL_RUNNING[caller.token_id]
        if running >= limit:
            who = f"token {caller.token_id}" if caller.token_id else "the caller without a token"
            raise TooManyRequests(f"{who} already runs {running} SQL queries, the limit "
                                  f"(ANNOTATE_SQL_MAX_CONCURRENT_PER_TOKEN) is {limit}; retry when one has ended")
        _SQL_RUNNING[caller.token_id] += 1
    operator = caller.token_id == OPERATOR
    threads = _sql_threads("operator" if operator else "shared", limit if operator else limit + _SQL_SPARE_THREADS)
    future = threads.submit(call)
    future.add_done_callback(functools.partial(_release_sql, caller.token_id))
    return future


def _release_sql(token_id: str | None, _done: Future) -> None:
    """Free a caller's SQL slot once its query has ended (or was cancelled before it began)."""
    with _SQL_RUNNING_LOCK:
        _SQL_RUNNING[token_id] -= 1


@functools.cache
def _sql_threads(owner: str, workers: int) -> ThreadPoolExecutor:
    """The operator's or the shared user SQL threads, made once per size the settings give."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"user-sql-{owner}")


ROUTES = [
    dict(path="/healthz", endpoint=health, scope=None, methods=["GET"], tags=["service"]),
    dict(path="/v1/models", endpoint=list_models, scope="read", methods=["GET"], tags=["service"]),
    dict(path="/v1/prompts", endpoint=list_prompts, scope="read", methods=["GET"], tags=["service"]),
    dict(path="/v1/taxonomies", endpoint=push_taxonomy, scope="write", methods=["POST"], status_code=201, tags=["taxonomies"],
         response_model=TaxonomyCreated,
         openapi_extra={"requestBody": {"required": True, "content": {"application/yaml": {"schema": {"type": "string"}}}}}),
    dict(path="/v1/taxonomies", endpoint=list_taxonomies, scope="read", methods=["GET"], tags=["taxonomies"]),
    dict(path="/v1/taxonomies/{name}", endpoint=get_taxonomy, scope="read", methods=["GET"], tags=["taxonomies"]),
    dict(path="/v1/taxonomies/{name}/tune", endpoint=tune_taxonomy, scope="write", methods=["POST"],
         tags=["taxonomies"]),
    dict(path="/v1/taxonomies:induce", endpoint=induce_taxonomy, scope="write", methods=["POST"], status_code=202,
         tags=["taxonomies"]),
    dict(path="/v1/inductions/{induction_id}", endpoint=get_induction, scope="read", methods=["GET"], tags=["taxonomies"],
         response_model=InductionStatus),
    dict(path="/v1/jobs", endpoint=create_job, scope="write", methods=["POST"], status_code=202, tags=["jobs"],
         response_model=JobCreated),
    dict(path="/v1/jobs", endpoint=list_jobs, scope="read", methods=["GET"], tags=["jobs"]),
    dict(path="/v1/jobs/{job_id}", endpoint=get_job, scope="read", methods=["GET"], tags=["jobs"],
         response_model=JobStatus),
    dict(path="/v1/jobs/{job_id}", endpoint=cancel_job, scope="write", methods=["DELETE"], tags=["jobs"],
         response_model=JobStatus),
    dict(path="/v1/jobs/{job_id}/labels", endpoint=job_labels, scope="read", methods=["GET"], tags=["jobs"]),
    dict(path="/v1/jobs/{job_id}/failures", endpoint=job_failures, scope="read", methods=["GET"], tags=["jobs"]),
    dict(path="/v1/sql", endpoint=query_sql, scope="read", methods=["POST"], tags=["sql"], response_model=SqlResponse),
]
