"""HTTP routes of the gold standard and label quality: samples, human labels, report, calibration, estimates."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from service.api.auth import READ, WRITE, caller_of
from service.api.context import OneAtATime, hosted, read_upload
from service.api.schemas import AggregateRequest, CalibrateRequest, EstimateRequest, GoldSampleRequest, LabelIssuesRequest
from service.quality import gold
from service.quality import report as quality
from service.vocabulary import GoldFormat, IssueKind

router = APIRouter(tags=["quality"])


@router.post("/v1/jobs/{job_id}/gold-sample", dependencies=[WRITE], status_code=201)
async def draw_gold_sample(request: Request, job_id: str, body: GoldSampleRequest) -> JSONResponse:
    """Draw a gold sample of a finished job under a design, storing each document's inclusion probability."""
    store = hosted(request).store
    drawn = await asyncio.to_thread(gold.draw, store, job_id, size=body.size, design=body.design, seed=body.seed,
                                    replace=body.replace)
    await asyncio.to_thread(quality.forget_stale, store, job_id)  # the old report and gold ranking are not its
    return JSONResponse(drawn, status_code=201)


@router.get("/v1/jobs/{job_id}/gold-sample", dependencies=[READ])
async def get_gold_sample(request: Request, job_id: str,
                          format: GoldFormat = Query("json")):
    """The sampled documents: JSON rows, a CSV to fill in, or Label Studio tasks."""
    ctx = hosted(request)
    sample = await asyncio.to_thread(ctx.store.quality.sample, job_id)
    if format == "csv":
        return PlainTextResponse(gold.to_csv(sample), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{job_id}.gold.csv"'})
    if format == "labelstudio":
        job = await asyncio.to_thread(ctx.store.jobs.get, job_id)
        taxonomy = (await asyncio.to_thread(ctx.store.taxonomies.get, job.taxonomy, job.taxonomy_version)).taxonomy
        return {"tasks": gold.to_label_studio(sample), "label_config": gold.label_studio_config(taxonomy.label_names())}
    return sample


@router.post("/v1/jobs/{job_id}/gold", dependencies=[WRITE], openapi_extra={"requestBody": {"required": True, "content": {
             "application/json": {"schema": {"type": "object"}}, "text/csv": {"schema": {"type": "string"}}}}})
async def put_gold_labels(request: Request, job_id: str,
                          annotator: str | None = Query(None, description="Who labelled, when the body does not say.")):
    """Human labels for sampled documents: JSON, a CSV (Content-Type text/csv) or a Label Studio export."""
    ctx = hosted(request)
    await asyncio.to_thread(ctx.store.jobs.state, job_id)  # 404 before reading the upload
    body = await read_upload(request, "gold labels")
    rows = await asyncio.to_thread(gold.parse_upload, body, request.headers.get("content-type", ""), annotator)
    answer = await asyncio.to_thread(gold.put_labels, ctx.store, job_id, rows,
                                     max_annotators=ctx.settings.gold_max_annotators)
    await asyncio.to_thread(quality.forget_label_issues, ctx.store, job_id, ("gold",))  # it ranked other labels
    return answer


@router.get("/v1/jobs/{job_id}/report", dependencies=[READ])
async def job_report(request: Request, job_id: str) -> dict:
    """The job's last computed quality report against the gold sample, with when it was computed."""
    return await asyncio.to_thread(quality.stored_report, hosted(request).store, job_id)


@router.post("/v1/jobs/{job_id}/report", dependencies=[WRITE])
async def compute_report(request: Request, job_id: str) -> dict:
    """Compute the quality report now and keep it (the answer, and the report tables in DuckDB)."""
    return await asyncio.to_thread(quality.report, hosted(request).store, job_id)


@router.post("/v1/jobs/{job_id}/calibrate", dependencies=[WRITE])
async def calibrate_job(request: Request, job_id: str, body: CalibrateRequest) -> dict:
    """Conformal candidate-set threshold and abstention threshold from the gold sample; the report is renewed."""
    store = hosted(request).store
    result = await asyncio.to_thread(quality.calibrate, store, job_id, alpha=body.alpha,
                                     target_accuracy=body.target_accuracy, seed=body.seed)
    await asyncio.to_thread(quality.refresh_report, store, job_id)
    return result


@router.post("/v1/jobs/{job_id}/estimate", dependencies=[READ])
async def estimate_job(request: Request, job_id: str, body: EstimateRequest) -> dict:
    """DSL estimates with the naive and gold-only ones beside them."""
    return await asyncio.to_thread(quality.estimate, hosted(request).store, job_id, target=body.target,
                                   outcome=body.outcome, covariates=body.covariates, model=body.model,
                                   level=body.level, seed=body.seed)


RECOMPUTING = OneAtATime("a label-issue ranking or a re-aggregation")  # each embeds or refines a whole job


@router.get("/v1/jobs/{job_id}/label-issues", dependencies=[READ])
async def job_label_issues(request: Request, job_id: str, kind: IssueKind = Query("gold"),
                           limit: int = Query(50, ge=1, le=10_000)) -> dict:
    """The last ranking of likely label errors of a kind, most suspicious first, with when it was computed."""
    return await asyncio.to_thread(quality.stored_label_issues, hosted(request).store, job_id, kind=kind, limit=limit)


@router.post("/v1/jobs/{job_id}/label-issues", dependencies=[WRITE])
async def rank_label_issues(request: Request, job_id: str, body: LabelIssuesRequest) -> dict:
    """Rank likely label errors among gold labels or the job's own labels now, and keep the ranking."""
    return await RECOMPUTING.run(caller_of(request).token_id, asyncio.to_thread(
        quality.label_issues, hosted(request).store, job_id, kind=body.kind, limit=body.limit,
        max_documents=body.max_documents))


@router.get("/v1/jobs/{job_id}/agreement", dependencies=[READ])
async def job_agreement(request: Request, job_id: str) -> dict:
    """Pairwise agreement, Cohen's kappa and Krippendorff's alpha of a several-annotator job's annotators."""
    return await asyncio.to_thread(quality.annotator_agreement, hosted(request).store, job_id)


def _reaggregated(ctx, job_id: str, method: str) -> str:
    """Relabel a job with ``method``, then refresh what its labels feed (the report; label issues are stale)."""
    chosen = ctx.runner.aggregate(job_id, method)
    quality.refresh_report(ctx.store, job_id)
    quality.forget_label_issues(ctx.store, job_id, ("gold", "llm"))
    return chosen


@router.post("/v1/jobs/{job_id}/aggregate", dependencies=[WRITE])
async def aggregate_job(request: Request, job_id: str, body: AggregateRequest) -> dict:
    """Recompute a several-annotator job's labels with another method."""
    ctx = hosted(request)
    method = await RECOMPUTING.run(caller_of(request).token_id, asyncio.to_thread(_reaggregated, ctx, job_id,
                                                                                  body.method))
    job = await asyncio.to_thread(ctx.store.jobs.get, job_id)
    return {"job_id": job_id, "aggregation": method, "refinement": job.annotator_spec.get("refinement")}
