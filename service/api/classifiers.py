"""HTTP routes of distilled classifiers: train, list, inspect, predict, export."""

from __future__ import annotations

import asyncio
import tarfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.auth import ADMIN, READ
from service.api.context import built, hosted, sent_once
from service.api.schemas import ClassifierRequest, PredictRequest
from service.errors import Conflict, cause_of
from service.store.classifiers import Classifier, ClassifierSummary
from service.work.trainings import as_labels

router = APIRouter(tags=["classifiers"])


@router.post("/v1/classifiers", dependencies=[ADMIN], status_code=202)
async def create_classifier(request: Request, body: ClassifierRequest) -> JSONResponse:
    """Start training a student from finished jobs; 202 with its id (GET it for progress and metrics)."""
    options = body.model_dump(include={"targets", "weighting", "abstained", "holdout", "epochs", "seed"})
    started = await hosted(request).classifiers.submit(jobs=body.jobs, kind=body.kind, name=body.name,
                                                       options=options)
    return JSONResponse(started, status_code=202)


@router.get("/v1/classifiers", dependencies=[READ])
async def list_classifiers(request: Request) -> list[ClassifierSummary]:
    """Every student, newest first."""
    return await asyncio.to_thread(hosted(request).store.classifiers.all)


@router.get("/v1/classifiers/{ref}", dependencies=[READ])
async def get_classifier(request: Request, ref: str) -> Classifier:
    """A student (by id, or the newest ready version of a name) with its training report and metrics."""
    return await asyncio.to_thread(hosted(request).store.classifiers.get, ref)


async def _ready(request: Request, ref: str) -> Classifier:
    """A student that finished training, or a 409 saying where it stands."""
    student = await asyncio.to_thread(hosted(request).store.classifiers.get, ref)
    if student.status != "ready":
        raise Conflict(f"classifier {student.classifier_id} is {student.status}"
                       + (f": {student.error}" if student.error else "; wait until it is ready"))
    return student


@router.post("/v1/classifiers/{ref}/predict", dependencies=[READ])
async def predict(request: Request, ref: str, body: PredictRequest) -> dict:
    """Labels for a batch of texts, in the same shape as the LLM's labels."""
    ctx = hosted(request)
    student = await _ready(request, ref)
    taxonomy = (await asyncio.to_thread(ctx.store.taxonomies.get, student.taxonomy, student.taxonomy_version)).taxonomy
    try:
        answer = await ctx.students.predict.remote(student.path, body.texts)
    except Exception as exc:  # Ray's wrapper hides the student's own error
        raise cause_of(exc) from None
    return {"classifier_id": student.classifier_id, "labels": as_labels(answer["probs"], answer["classes"], taxonomy)}


@router.get("/v1/classifiers/{ref}/export", dependencies=[READ])
async def export_classifier(request: Request, ref: str) -> StreamingResponse:
    """The student's directory as a .tar.gz: model.joblib (a scikit-learn pipeline) or a transformers model."""
    ctx = hosted(request)
    student = await _ready(request, ref)
    name = f"{student.name}-v{student.version}"
    archive = await built(ctx.settings.download_dir, ".tar.gz", lambda out: _archive(Path(student.path or ""), out, name))
    return sent_once(archive, "application/gzip", f"{name}.tar.gz")


def _archive(source: Path, archive: Path, name: str) -> None:
    """Pack a directory under one top folder."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=name)
