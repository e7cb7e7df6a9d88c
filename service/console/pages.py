"""The web console: server-rendered pages over the same store and API, served by the ingress.

Pages are Jinja2 templates; charts are inline SVG drawn by ``service.console.charts`` on the server,
so the console needs nothing from the network and its numbers are in the page itself. The
small script (``static/console.js``) only polls job status and drives gold labelling, which
saves every answer through the public gold API (``POST /v1/jobs/{id}/gold``).

The gold labelling page never sends the LLM's label to the browser: a person cannot be
anchored by what they cannot see.
"""

from __future__ import annotations

import asyncio
import difflib
from itertools import zip_longest
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from service.api.auth import PUBLIC, READ, identify
from service.api.context import hosted
from service.api.schemas import JobStatus
from service.api.security import COOKIE, is_operator
from service.console import charts
from service.errors import AnnotateError, NotFound, TooManyRequests, Unauthenticated
from service.quality import report as quality
from service.store.annotations import DOCUMENT_FILTERS
from service.taxonomy import NONE_LABEL
from service.vocabulary import DocumentFilter

HERE = Path(__file__).parent
STATIC = {path.name: path for path in (HERE / "static").iterdir()}
PAGE_SIZE = 50
MAX_PAGE = 1_000_000  # 50 million documents deep; keeps the row offset far inside DuckDB's BIGINT
TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
TEMPLATES.filters["percent"] = lambda v, digits=1: "–" if v is None else f"{100 * v:.{digits}f}%"

router = APIRouter(include_in_schema=False)


def render_page(template: str, status_code: int = 200, **context) -> HTMLResponse:
    """Render one template of the console."""
    return HTMLResponse(TEMPLATES.get_template(template).render(**context), status_code=status_code)


@router.get("/console", dependencies=[READ], response_class=HTMLResponse)
async def jobs_page(request: Request) -> HTMLResponse:
    """Every recent job with live progress, throughput and ETA."""
    store = hosted(request).store
    jobs = await asyncio.to_thread(lambda: [_job_summary(store, row.job_id) for row in store.jobs.recent(100)])
    return render_page("jobs.html", jobs=jobs)


def _job_summary(store, job_id: str) -> dict:
    """A job's status as the API reports it, as plain JSON-ready data."""
    return JobStatus.from_job(store.jobs.get(job_id)).model_dump(mode="json")


@router.get("/console/jobs/{job_id}", dependencies=[READ], response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, label: str | None = None,
                   show: DocumentFilter = Query("all"),
                   below: float = Query(0.6, ge=0, le=1), page: int = Query(1, ge=1, le=MAX_PAGE)) -> HTMLResponse:
    """One job: label distribution, abstention reasons and a filterable table of its documents."""
    store = hosted(request).store
    job = await asyncio.to_thread(_job_summary, store, job_id)
    counts = await asyncio.to_thread(store.annotations.label_counts, job_id)
    reasons = await asyncio.to_thread(store.annotations.abstention_counts, job_id)
    documents, matching = await asyncio.to_thread(store.annotations.document_page, job_id, label=label or None, show=show,
                                                  below=below, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
    distribution = charts.bar_chart([(r["label"], r["n"]) for r in counts], title="Documents per label",
                                    value_label="documents")
    abstentions = charts.bar_chart([(r["reason"], r["n"]) for r in reasons], title="Abstentions by reason",
                                   value_label="documents")
    return render_page("job.html", job=job, counts=counts, reasons=reasons, documents=documents, matching=matching,
                 filters={"label": label or "", "show": show, "below": below}, page=page,
                 pages=max(1, -(-matching // PAGE_SIZE)), show_options=DOCUMENT_FILTERS,
                 distribution_chart=Markup(distribution), abstention_chart=Markup(abstentions))


@router.get("/console/jobs/{job_id}/gold", dependencies=[READ], response_class=HTMLResponse)
async def gold_page(request: Request, job_id: str, annotator: str = "") -> HTMLResponse:
    """Label the job's gold sample one document at a time, without seeing the LLM's labels."""
    store = hosted(request).store
    job = await asyncio.to_thread(_job_summary, store, job_id)
    taxonomy = (await asyncio.to_thread(store.taxonomies.get, job["taxonomy"], job["taxonomy_version"])).taxonomy
    descriptions = {label.name: label.description for label in taxonomy.labels}
    labels = [{"name": name, "description": descriptions.get(name, ""), "key": key}  # past 32 labels: click only
              for name, key in zip_longest(taxonomy.label_names(), _shortcut_keys()) if name is not None]
    try:
        sample = await asyncio.to_thread(store.quality.sample, job_id)
    except NotFound:
        sample = None
    documents = [{"doc_id": row["doc_id"], "text": row["text"]} for row in sample or []]  # no LLM label, on purpose
    answers = {r["doc_id"]: r["label"] for r in await asyncio.to_thread(store.quality.gold_label_rows, job_id)
               if r["annotator"] == annotator.strip()}
    return render_page("gold.html", job=job, labels=labels, none_label=NONE_LABEL, annotator=annotator.strip(),
                 documents=documents, answers=answers, has_sample=sample is not None)


def _shortcut_keys() -> list[str]:
    """Keys for labels in order: 1–9, then letters that no other action uses."""
    return [*"123456789", *(c for c in "abcdefghijklmopqrtuvwxyz")]  # n: none of these, s: skip


@router.get("/console/jobs/{job_id}/quality", dependencies=[READ], response_class=HTMLResponse)
async def quality_page(request: Request, job_id: str) -> HTMLResponse:
    """The job's stored quality report as pictures: calibration, confusion, coverage, per-label F1, DSL shares.

    It reads what the last computation kept (its POST, a calibration or a relabelling renew it) and says when.
    """
    store = hosted(request).store
    job = await asyncio.to_thread(_job_summary, store, job_id)
    try:
        report = await asyncio.to_thread(quality.stored_report, store, job_id)
    except AnnotateError as exc:
        return render_page("quality.html", job=job, problem=str(exc))
    shares = report["shares"]
    return render_page("quality.html", job=job, report=report, shares=shares, problem=None,
                 charts={name: Markup(svg) for name, svg in _quality_charts(report, shares).items()})


def _quality_charts(report: dict, shares: dict) -> dict[str, str]:
    """Each figure of the quality page, drawn from the report and the DSL label shares."""
    bins = [r for r in report["reliability"] if r["n"]]
    labels = sorted({c["gold"] for c in report["confusion"]} | {c["predicted"] for c in report["confusion"]})
    cells = {(c["gold"], c["predicted"]): c["weighted_n"] for c in report["confusion"]}
    return {
        "reliability": charts.line_chart(
            [{"name": "LLM", "points": [(r["confidence"], r["accuracy"]) for r in bins],
              "sizes": [r["n"] for r in bins]}],
            title="Reliability diagram", x_title="confidence", y_title="accuracy on gold", diagonal=True),
        "confusion": charts.heatmap(labels, labels, [[cells.get((g, p), 0.0) for p in labels] for g in labels],
                                    title="Confusion matrix (weighted)", row_title="gold", col_title="predicted"),
        "selective": charts.line_chart(
            [{"name": "accuracy", "points": [(s["coverage"], s["accuracy"]) for s in report["selective"]]}],
            title="Accuracy vs coverage", x_title="coverage (most confident first)", y_title="accuracy"),
        "f1": charts.bar_chart([(r["label"], r["f1"]) for r in report["per_label"]], title="F1 per label",
                               percent=True, max_value=1.0),
        **({} if not shares["estimates"] else {"shares": charts.interval_chart(
            [{"label": r["label"], "estimates": [{"series": series, **r[key]} for series, key in
                                                 (("DSL", "dsl"), ("naive", "naive"), ("gold only", "gold_only"))]}
             for r in shares["estimates"]], title="Label shares", x_title="share of documents")}),
    }


@router.get("/console/taxonomies", dependencies=[READ], response_class=HTMLResponse)
async def taxonomies_page(request: Request) -> HTMLResponse:
    """Every taxonomy with its versions."""
    rows = await asyncio.to_thread(hosted(request).store.taxonomies.all)
    return render_page("taxonomies.html", taxonomies=rows)


@router.get("/console/taxonomies/{name}", dependencies=[READ], response_class=HTMLResponse)
async def taxonomy_page(request: Request, name: str, version: str | None = None,
                        compare: str | None = None) -> HTMLResponse:
    """One taxonomy's YAML at a version, its versions, and the diff from another version."""
    store = hosted(request).store
    versions = await asyncio.to_thread(store.taxonomies.versions, name)
    shown = await asyncio.to_thread(store.taxonomies.get, name, version)
    older = compare or next((v["version"] for v in versions if v["version"] != shown.version), None)
    diff = []
    if older:
        before = await asyncio.to_thread(store.taxonomies.get, name, older)
        older = before.version
        diff = await asyncio.to_thread(_diff, before.yaml, shown.yaml, f"{name}@{older}", f"{name}@{shown.version}")
    return render_page("taxonomy.html", name=name, version=shown.version, yaml=shown.yaml, versions=versions,
                       compare=older, diff=diff)


DIFF_MAX_LINES = 5000  # difflib is quadratic at worst: a page view must not cost the ingress minutes


def _diff(before: str, after: str, old_name: str, new_name: str) -> list[str]:
    """Unified diff lines of two YAML versions, or one line saying they are too long to compare here."""
    old_lines, new_lines = before.splitlines(), after.splitlines()
    if max(len(old_lines), len(new_lines)) > DIFF_MAX_LINES:
        return [f"(not compared here: more than {DIFF_MAX_LINES:,} lines; compare the YAML of the two versions "
                "from GET /v1/taxonomies/{name}?version=...)"]
    return list(difflib.unified_diff(old_lines, new_lines, old_name, new_name, lineterm=""))


@router.get("/", dependencies=[PUBLIC])
async def home() -> RedirectResponse:
    """The service's root is the console."""
    return RedirectResponse("/console")


@router.get("/console/static/{name}", dependencies=[PUBLIC])
async def static_file(name: str) -> FileResponse:
    """The console's script and style sheet (shipped in the package: nothing comes from a CDN)."""
    if name not in STATIC:
        raise NotFound(f"no console file {name!r}")
    return FileResponse(STATIC[name])


@router.get("/console/login", dependencies=[PUBLIC], response_class=HTMLResponse)
async def login_page(request: Request, next: str = "/console", why: str = "") -> HTMLResponse:
    """Ask for a token (the console's pages cannot send a bearer header)."""
    return render_page("login.html", why=why, next=_local(next))


LOGIN_FORM_BYTES = 4096


@router.post("/console/login", dependencies=[PUBLIC])
async def login(request: Request):
    """Check the form's token, then keep it in an HttpOnly, SameSite=Strict cookie."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_FORM_BYTES:
            return HTMLResponse("login form too large", status_code=413)
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    token, next = form.get("token", "").strip(), form.get("next", "/console")
    try:
        if is_operator(token, hosted(request).settings.admin_token):
            raise Unauthenticated("the operator's token is not for browsers: sign in with a token made by "
                                  "`annotate token create`")
        if not token:
            raise Unauthenticated("enter an API token")
        await identify(hosted(request), token, request)
    except (Unauthenticated, TooManyRequests) as exc:
        return render_page("login.html", status_code=exc.status_code, why=str(exc), next=_local(next))
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


def _local(path: str) -> str:
    """Only redirect within the console (no open redirects)."""
    return path if path.startswith("/console") and "//" not in path else "/console"
