"""Routes about the service itself: health, the configured models and the prompt templates."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from service import __version__
from service.api.auth import PUBLIC, READ
from service.api.context import hosted
from service.labelling.prompts import template_names

router = APIRouter(tags=["service"])

@router.get("/healthz", dependencies=[PUBLIC])
async def health(request: Request) -> dict:
    """Liveness plus what engine the service labels with."""
    runner = hosted(request).runner
    default = runner.panels.models[runner.panels.default_model].info
    return {"status": "ok", "version": __version__, "engine": default.engine, "model": default.model,
            "default_model": runner.panels.default_model}


@router.get("/v1/models", dependencies=[READ])
async def list_models(request: Request) -> list[dict]:
    """Every configured model with its engine and the live queue depth and throughput of its replicas."""
    ctx = hosted(request)
    reports = await asyncio.gather(*(handle.report.remote() for handle in ctx.models.values()),
                                   return_exceptions=True)
    return [{"name": name, "engine": model.info.engine, "model": model.info.model, "decoding": model.info.decoding,
             "default": name == ctx.runner.panels.default_model,
             "stats": None if isinstance(report, BaseException) else report}
            for (name, model), report in zip(ctx.runner.panels.models.items(), reports)]


@router.get("/v1/prompts", dependencies=[READ])
async def list_prompts(request: Request) -> list[str]:
    """The prompt templates a job's LLM annotators may name (the registry; names, never paths)."""
    return sorted(template_names())
