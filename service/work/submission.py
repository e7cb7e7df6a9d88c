"""Submitting a job: what it may ask for, the annotators it gets, and its documents stored before it is queued.

``JobRequest`` is what a job asks for, validated where it arrives (the HTTP body of
``POST /v1/jobs``, which the CLI sends too). ``submit_job`` is the policy: a classifier
makes a cascade; no annotators make the default panel (and its prompt tuning); batch mode
takes one LLM annotator without shortlists, demonstrations or ``reject``; the longest
document follows ``long_documents``; a token's active jobs are limited. It stores the job
and hands it to the ``JobRunner``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.documents import CHARS_SETTING, batched, check_document, local_source, read_file
from service.errors import InvalidInput, PayloadTooLarge, TooManyRequests
from service.labelling.aggregation import DEFAULT_PANEL_AGGREGATION
from service.labelling.annotators import EMBEDDING, EmbeddingLabeller
from service.labelling.labeller import Labeller
from service.settings import Settings
from service.store import Store
from service.store.jobs import document_batch
from service.taxonomy import Shortlist, Taxonomy
from service.vocabulary import AggregationMethod, LongDocuments, Mode
from service.work.jobs import JobRunner
from service.work.panels import CASCADE, job_record

SUBMITTING: defaultdict[str | None, asyncio.Lock] = defaultdict(asyncio.Lock)  # per token: jobs and inductions


class DocumentIn(BaseModel):
    """One document of an inline job; ``id`` defaults to its position in the list."""

    model_config = ConfigDict(extra="forbid")
    id: str | int | None = None
    text: str
    meta: dict | None = None


class AnnotatorIn(BaseModel):
    """One annotator of a job: an LLM (a model and a prompt template) or the embedding zero-shot annotator."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=100,
                             description="Shown in reports; default MODEL/PROMPT, or 'embedding'.")
    kind: Literal["llm", "embedding"] = "llm"  # of AnnotatorKind: a student is named by 'classifier'
    model: str | None = Field(None, description="llm: a model from the models config; default the job's.")
    prompt: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
                               description="llm: a template's name (classify, classify_terse, ...; GET /v1/prompts).")
    weight: float | None = Field(None, gt=0, description="weighted_soft_vote: this annotator's weight; default "
                                                         "estimated from agreement (Wawa).")

    @model_validator(mode="after")
    def _embedding_takes_no_model(self) -> AnnotatorIn:
        """The embedding annotator has its own model and no prompt."""
        if self.kind == "embedding" and (self.model or self.prompt):
            raise ValueError("the embedding annotator takes no 'model' or 'prompt' (it reads with MiniLM, or "
                             "ANNOTATE_EMBEDDING_MODEL_DIR)")
        return self


class JobRequest(BaseModel):
    """A labelling job: a taxonomy and either inline documents or a server-side source file."""

    model_config = ConfigDict(extra="forbid")
    taxonomy: str = Field(min_length=1, description="Name of a pushed taxonomy.")
    taxonomy_version: str | None = Field(None, description="A content-hash version; default the newest.")
    model: str | None = Field(None, description="A model from the models config; default the taxonomy's, else the service's.")
    documents: list[DocumentIn] | None = None
    source: str | None = Field(None, description="A .jsonl/.csv/.parquet file, its path relative to "
                                                 "ANNOTATE_INPUT_DIR (batch mode: .jsonl/.parquet, or an s3:// or "
                                                 "gs:// URI if allowed).")
    mode: Mode = Field(
        "stream", description="stream: documents stored with the job, labelled batch by batch; batch: a large "
                              "source labelled shard by shard on Ray Data, results written as Parquet shards.")
    shard_size: int | None = Field(None, ge=1, description="Batch mode: rows per shard (default ANNOTATE_SHARD_SIZE).")
    annotators: list[AnnotatorIn] | None = Field(
        None, min_length=1, max_length=20, description="Several annotators that vote (default: one LLM annotator).")
    aggregation: AggregationMethod = Field(
        "dawid_skene", description="How several annotators' votes become the job's labels.")
    classifier: str | None = Field(None, description="A cascade: this distilled classifier (id or name) labels every "
                                                     "document and only its unsure ones go to the LLM ('model').")
    cascade_threshold: float = Field(0.8, gt=0, le=1, description="Cascade: documents the classifier is less "
                                                                  "confident of than this go to the LLM.")
    long_documents: LongDocuments | None = Field(
        None, description="How the LLM reads documents over ANNOTATE_MODEL_INPUT_CHARS: truncate, reject (stream "
                          "mode only), head_tail or chunk; default the taxonomy's long_documents.")
    shortlist: Shortlist | None = Field(
        None, description="Score each document on its K most plausible labels only ({\"k\": 10} or {\"k\": \"auto\", "
                          "\"recall\": 0.98}); default the taxonomy's shortlist. Stream mode, single-label taxonomies.")
    text_field: str = "text"
    id_field: str = "id"

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        """Exactly one of documents and source, never an empty list, and batch mode only for a source."""
        if (self.documents is None) == (self.source is None):
            raise ValueError("give exactly one of 'documents' (inline) or 'source' (server-side file)")
        if self.documents is not None and not self.documents:
            raise ValueError("'documents' is empty; send at least one document")
        if self.mode == "batch" and self.source is None:
            raise ValueError("mode 'batch' labels a server-side 'source'; inline documents use mode 'stream'")
        if self.classifier is not None and (self.annotators is not None or self.mode == "batch"):
            raise ValueError("'classifier' makes a stream-mode cascade (the classifier, then the LLM on its unsure "
                             "documents); it takes no 'annotators' and no mode 'batch'")
        return self


@dataclass(frozen=True)
class Submitted:
    """A job stored and queued."""

    job_id: str
    total: int
    taxonomy_version: str
    model: str
    mode: Mode
    annotators: list[str]


def _default_panel(store: Store, settings: Settings, body: JobRequest) -> bool:
    """Whether a job that names no annotators gets the default panel (ANNOTATE_DEFAULT_ANNOTATORS).

    The LLM and the embedding annotator, measured together (benchmarks/zero_shot.py) against
    the LLM alone: the embedding annotator is the stronger zero-shot annotator on TREC, the
    speeches and news; the LLM's prompt is tuned on the job's documents (a prompt that gives
    every document the same label agrees least with the embedding annotator, so tuning drops
    it), and calibrated_mean batch-calibrates an untuned LLM so such a prompt cannot outvote
    it; 'refined' then fits the job (service.labelling.refinement). The embedding
    annotator labels single-label taxonomies in stream jobs only and never says "none of
    these", so multi-label taxonomies, taxonomies that allow "none of these" (its vote would
    outweigh the LLM's abstention) and batch jobs keep the LLM alone.
    """
    if settings.default_annotators != "llm+embedding" or body.mode != "stream":
        return False
    taxonomy = store.taxonomies.get(body.taxonomy, body.taxonomy_version).taxonomy
    return not taxonomy.multi_label and not taxonomy.abstention.allow_none


async def submit_job(runner: JobRunner, settings: Settings, body: JobRequest, *, owner: str | None,
                     limited: bool) -> Submitted:
    """Build the job's annotators, check what its mode allows, store its documents and queue it.

    ``limited``: the owner (an API token) may have only ``ANNOTATE_MAX_ACTIVE_JOBS_PER_TOKEN``
    jobs queued or running; its submissions are taken one at a time so the count stays true.
    """
    annotators = None if body.annotators is None else [a.model_dump() for a in body.annotators]
    aggregation: str = body.aggregation  # or CASCADE, which no request names
    if body.classifier is not None:
        annotators, aggregation = [{"kind": "classifier", "classifier": body.classifier}, {"kind": "llm"}], CASCADE
    default_panel = annotators is None and await asyncio.to_thread(_default_panel, runner.store, settings, body)
    if default_panel:
        annotators = [{"kind": "llm"}, {"kind": EMBEDDING}]
        aggregation = aggregation if "aggregation" in body.model_fields_set else DEFAULT_PANEL_AGGREGATION
    shortlist = None if body.shortlist is None else body.shortlist.model_dump()
    panel = await asyncio.to_thread(partial(runner.panels.panel, body.taxonomy, body.taxonomy_version, body.model,
                                            annotators, body.long_documents, shortlist, default=default_panel))
    labeller = panel[0][1]
    auto_tune = default_panel and settings.auto_tune and await asyncio.to_thread(runner.panels.untuned, labeller)
    if body.mode == "batch" and getattr(labeller, "shortlister", None) is not None:
        raise InvalidInput("shortlisted labelling (the job's or the taxonomy's 'shortlist') runs in mode 'stream' only: "
                           "the retriever lives in the service")
    if body.mode == "batch" and getattr(labeller, "demonstrator", None) is not None:
        raise InvalidInput(f"taxonomy {body.taxonomy!r} sets 'demonstrations', which run in mode 'stream' only: the "
                           "demonstrations' pool and its embeddings live in the service")
    if body.mode == "batch" and (len(panel) > 1 or isinstance(labeller, EmbeddingLabeller)):
        raise InvalidInput("mode 'batch' runs one LLM annotator; label with several annotators in mode 'stream'")
    if body.mode == "batch" and isinstance(labeller, Labeller) and labeller.long_documents == "reject":
        raise InvalidInput(f"{_who_says(body, labeller.taxonomy)} long_documents: reject, which mode 'stream' checks at "
                           "submission; in mode 'batch' choose truncate, head_tail or chunk (the job's "
                           "'long_documents' overrides the taxonomy's)")
    if not limited or owner is None:  # only an API token's submissions are limited
        return await _create(runner, settings, body, panel, aggregation, owner, auto_tune, default_panel)
    async with SUBMITTING[owner]:  # one submission per token at a time: the limit's count stays true
        await asyncio.to_thread(_check_job_limit, runner.store, settings, owner)
        return await _create(runner, settings, body, panel, aggregation, owner, auto_tune, default_panel)


async def _create(runner: JobRunner, settings: Settings, body: JobRequest, panel: list, aggregation: str | None,
                  owner: str | None, auto_tune: bool = False, default_panel: bool = False) -> Submitted:
    """Store the job's documents (or shard plan) and queue it."""
    labeller = panel[0][1]
    job_id = "job_" + uuid.uuid4().hex[:16]
    llm = next((labeller.model for _, labeller in panel if isinstance(labeller, Labeller)), None)
    model = llm or runner.panels.model(body.model).name
    job = dict(job_id=job_id, taxonomy=body.taxonomy, model=model, created_by=owner,
               long_documents=body.long_documents,
               shortlist=None if body.shortlist is None else body.shortlist.model_dump(),
               **job_record(panel, aggregation=aggregation, threshold=body.cascade_threshold, auto_tune=auto_tune,
                            default=default_panel))
    if body.mode == "batch":
        shards, stamp = await asyncio.to_thread(runner.batch_runner.plan, body.source, body.shard_size)
        batch = {"source": body.source, "text_field": body.text_field, "id_field": body.id_field, "stamp": stamp}
        total = await asyncio.to_thread(runner.store.jobs.create, **job, batch=batch, shards=shards)
    else:
        max_chars, limit_name = _longest(settings, body, labeller.taxonomy)
        rows = _job_rows(settings, body, max_chars)
        batches = (document_batch(job_id, batch, i * settings.batch_size)
                   for i, batch in enumerate(batched(rows, settings.batch_size)))
        try:
            total = await asyncio.to_thread(runner.store.jobs.create, **job, batches=batches)
        except PayloadTooLarge as exc:
            raise PayloadTooLarge(str(exc).replace(CHARS_SETTING, limit_name)) from exc
    runner.submit(job_id)
    return Submitted(job_id=job_id, total=total, taxonomy_version=labeller.taxonomy_version, model=model,
                     mode=body.mode, annotators=[row["name"] for row, _ in panel])


def _check_job_limit(store: Store, settings: Settings, owner: str) -> None:
    """A token may have so many jobs queued or running at once."""
    active, limit = store.jobs.active_of(owner), settings.max_active_jobs_per_token
    if active >= limit:
        raise TooManyRequests(f"token {owner} has {active} jobs queued or running, the limit "
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
    assert body.documents is not None  # exactly one of documents and source (JobRequest._one_input)
    if len(body.documents) > settings.max_documents_per_job:
        raise PayloadTooLarge(f"documents: {len(body.documents):,} documents is over the limit of "
                              f"{settings.max_documents_per_job:,} per job (ANNOTATE_MAX_DOCUMENTS_PER_JOB)")
    return (check_document(f"documents[{i}]", d.id if d.id is not None else i, d.text, d.meta, max_chars=max_chars)
            for i, d in enumerate(body.documents))


