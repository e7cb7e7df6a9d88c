"""Routes of taxonomies: push a YAML version, read them, tune a prompt, induce one from a corpus."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.auth import READ, WRITE, caller_of
from service.api.context import Context, OneAtATime, hosted, read_upload
from service.api.schemas import (
    InductionRequest,
    InductionStatus,
    TaxonomyCreated,
    TuneRequest,
)
from service.api.security import OPERATOR, Caller
from service.documents import check_document, local_source, read_file
from service.errors import (
    PayloadTooLarge,
    TaxonomyError,
    TooManyRequests,
)
from service.induction.inducer import InductionOptions, sample_texts
from service.labelling.tuning import tune
from service.settings import Settings
from service.taxonomy import Taxonomy, advice, parse_taxonomy
from service.work.submission import SUBMITTING

router = APIRouter(tags=["taxonomies"])

YAML_CHARS_PER_CHAR = 6  # "\u4e2d" in escaped YAML is one character of a label's text
YAML_CHARS_PER_LABEL = 500  # a label's keys, name, parent, indentation and comments, beside its counted text
TUNING = OneAtATime("a prompt tuning")  # apart from submissions: a tuning takes minutes and must not hold jobs back


@router.post("/v1/taxonomies", dependencies=[WRITE], status_code=201, response_model=TaxonomyCreated,
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/yaml": {"schema": {"type": "string"}}}}})
async def push_taxonomy(request: Request) -> JSONResponse:
    """Store a taxonomy from its YAML body; a changed file becomes a new version."""
    raw = await read_upload(request, "taxonomy YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaxonomyError("<request body>", [("", None, f"not valid UTF-8 at byte {exc.start}")]) from exc
    _check_yaml_size(len(text), hosted(request).settings)
    taxonomy = await asyncio.to_thread(parse_taxonomy, text, source="<request body>")  # the loop serves others
    _check_taxonomy_size(taxonomy, hosted(request).settings)
    pushed = await asyncio.to_thread(hosted(request).store.taxonomies.put, taxonomy, text)
    body = TaxonomyCreated(name=taxonomy.name, version=pushed.version, created=pushed.created, advice=advice(taxonomy))
    return JSONResponse(body.model_dump(), status_code=201)  # "created" says whether the version is new


def _check_yaml_size(chars: int, settings: Settings) -> None:
    """Refuse YAML longer than the largest taxonomy the limits allow could need, before it is parsed: pure-Python
    YAML reads about 300 kB a second (measured), so the upload limit alone would let one request hold a worker for
    half a minute. Its text may be written six characters a character (``yaml.safe_dump`` writes non-ASCII text as
    ``\\uXXXX`` unless told otherwise)."""
    limit = YAML_CHARS_PER_CHAR * settings.taxonomy_max_chars + YAML_CHARS_PER_LABEL * settings.taxonomy_max_labels
    if chars > limit:
        raise PayloadTooLarge(f"taxonomy YAML of {chars:,} characters, over the {limit:,} that the largest taxonomy "
                              f"allowed needs ({YAML_CHARS_PER_CHAR} per character of ANNOTATE_TAXONOMY_MAX_CHARS, as "
                              f"escaped text may take, and {YAML_CHARS_PER_LABEL} per label of "
                              "ANNOTATE_TAXONOMY_MAX_LABELS for keys and comments); shorten its comments or raise those "
                              "limits")


def _check_taxonomy_size(taxonomy: Taxonomy, settings: Settings) -> None:
    """Refuse a taxonomy whose labels or text are over the service's limits (each prompt would carry them)."""
    if len(taxonomy.labels) > settings.taxonomy_max_labels:
        raise PayloadTooLarge(f"taxonomy {taxonomy.name!r} has {len(taxonomy.labels):,} labels, over the limit of "
                              f"{settings.taxonomy_max_labels:,} (ANNOTATE_TAXONOMY_MAX_LABELS)")
    if (chars := taxonomy.text_chars()) > settings.taxonomy_max_chars:
        raise PayloadTooLarge(f"taxonomy {taxonomy.name!r} has {chars:,} characters of instruction, descriptions and "
                              f"examples, over the limit of {settings.taxonomy_max_chars:,} (ANNOTATE_TAXONOMY_MAX_CHARS)")


@router.get("/v1/taxonomies", dependencies=[READ])
async def list_taxonomies(request: Request) -> list[dict]:
    """Every stored taxonomy version."""
    return await asyncio.to_thread(hosted(request).store.taxonomies.all)


@router.get("/v1/taxonomies/{name}", dependencies=[READ])
async def get_taxonomy(request: Request, name: str, version: str | None = None) -> dict:
    """One taxonomy (newest version unless ``version``), with its YAML, all versions and its prompt tunings."""
    store = hosted(request).store
    stored = await asyncio.to_thread(store.taxonomies.get, name, version)
    versions = await asyncio.to_thread(store.taxonomies.versions, name)
    tunings = await asyncio.to_thread(store.taxonomies.tunings, name, stored.version)
    return {"name": name, "version": stored.version, "yaml": stored.yaml, "taxonomy": stored.taxonomy.model_dump(),
            "versions": versions, "tunings": tunings}


@router.post("/v1/taxonomies/{name}/tune", dependencies=[WRITE])
async def tune_taxonomy(request: Request, name: str, body: TuneRequest) -> dict:
    """Choose the taxonomy's prompt on a sample (service.labelling.tuning); jobs on it that name no prompt use the choice."""
    ctx, caller = hosted(request), caller_of(request)
    texts = [check_document(f"documents[{i}]", i, d.text, None, max_chars=ctx.settings.max_document_chars)["text"]
             for i, d in enumerate(body.documents)]
    return await TUNING.run(caller.token_id, tune(ctx.runner.panels, name, body.taxonomy_version, body.model, texts,
                                                  [d.label for d in body.documents], body.prompts, body.calibrations))


@router.post("/v1/taxonomies:induce", dependencies=[WRITE], status_code=202)
async def induce_taxonomy(request: Request, body: InductionRequest) -> JSONResponse:
    """Start inducing a taxonomy from a corpus sample; answer 202 with the induction's id."""
    ctx, caller = hosted(request), caller_of(request)
    async with SUBMITTING[caller.token_id]:  # checked and counted under one lock, as for jobs
        return await _start_induction(ctx, caller, body)


async def _start_induction(ctx: Context, caller: Caller, body: InductionRequest) -> JSONResponse:
    """Check the caller's induction limit, sample the corpus and start the induction."""
    if caller.token_id not in (None, OPERATOR):  # as for jobs: the operator and loopback use have no limit
        active, limit = ctx.inductions.active_of(caller.token_id), ctx.settings.max_active_jobs_per_token
        if active >= limit:
            raise TooManyRequests(f"token {caller.token_id} has {active} inductions running, the limit "
                                  f"(ANNOTATE_MAX_ACTIVE_JOBS_PER_TOKEN) is {limit}; wait for one to end")
    model = ctx.runner.panels.model(body.model).name
    base = (await asyncio.to_thread(ctx.store.taxonomies.get, body.base)).taxonomy if body.base else None
    if body.source is not None:
        rows = read_file(local_source(ctx.settings.input_dir, body.source), text_field=body.text_field, id_field=body.id_field,
                         max_chars=ctx.settings.max_document_chars, name=body.source)
        source = body.source
    else:
        assert body.documents is not None  # exactly one of documents and source (InductionRequest)
        rows = (check_document(f"documents[{i}]", i, d if isinstance(d, str) else d.text, None,
                               max_chars=ctx.settings.max_document_chars) for i, d in enumerate(body.documents))
        source = f"{len(body.documents)} inline documents"
    texts, corpus_size = await asyncio.to_thread(sample_texts, rows, body.sample_size, body.seed)
    texts = [text[: ctx.settings.model_input_chars] for text in texts]  # what the models read of each anyway
    options = InductionOptions(name=body.name, max_labels=body.max_labels,
                               report_size=body.report_size, seed=body.seed, method=body.method,
                               allow_none=body.allow_none)
    induction_id = "ind_" + uuid.uuid4().hex[:16]
    await asyncio.to_thread(ctx.store.inductions.create, induction_id, body.name,
                            body.model_dump(exclude={"documents"}) | {"model": model})
    ctx.inductions.submit(induction_id, texts, options, source=source, corpus_size=corpus_size, model=model,
                          base=base, push=body.push, owner=caller.token_id)
    return JSONResponse({"induction_id": induction_id, "status": "queued", "corpus_size": corpus_size,
                         "sample_size": len(texts)}, status_code=202)


@router.get("/v1/inductions/{induction_id}", dependencies=[READ], response_model=InductionStatus)
async def get_induction(request: Request, induction_id: str) -> InductionStatus:
    """An induction's progress; its YAML and review report once it succeeded."""
    ctx = hosted(request)
    induction = await asyncio.to_thread(ctx.store.inductions.get, induction_id)
    row = asdict(induction)
    if induction_id in ctx.inductions.live:  # running: its progress lives in memory, not in the database
        row.update(status="running", **dict(zip(("stage", "progress"), ctx.inductions.live[induction_id])))
    return InductionStatus(**{k: v for k, v in row.items() if k in InductionStatus.model_fields})
