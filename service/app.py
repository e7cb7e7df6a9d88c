"""The Ray Serve application: a FastAPI ingress that owns the store, and a model deployment.

    HTTP ─▶ Ingress (1 replica: FastAPI routes, DuckDB store, job runner)
                │  DeploymentHandle, one call per document
                ▼
            ModelServer (engine; @serve.batch gathers concurrent calls into one forward pass)

The ingress is the single DuckDB owner (DESIGN.md), so it runs exactly one replica;
the model deployment can be scaled out. ``build`` is the application builder named by
``deploy/serve-cpu.yaml`` (``serve run deploy/serve-cpu.yaml``) and used by ``annotate serve``.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from .api import Context, attach, create_api
from .engines import EngineInfo, ScoreRequest, create_engine
from .errors import EngineError
from .jobs import JobRunner
from .logs import configure_logging
from .settings import Settings
from .store import Store

api = create_api()
log = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, health_check_timeout_s=60)
class ModelServer:
    """Hosts one engine and batches concurrent score calls."""

    def __init__(self, settings: dict):
        parsed = Settings(**settings)
        configure_logging(parsed.log_level)
        self.engine = create_engine(parsed)
        self.score.set_max_batch_size(parsed.engine_max_batch)
        self.score.set_batch_wait_timeout_s(parsed.engine_batch_wait_s)

    def info(self) -> EngineInfo:
        """Identity of the engine, recorded on every annotation."""
        return self.engine.info

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Score a batch gathered from concurrent callers."""
        return await self.engine.score(requests)


def handle_scorer(model: DeploymentHandle):
    """A job-runner scorer that sends each request as its own call, so Serve batches them."""

    async def score(requests: list[ScoreRequest]) -> list:
        calls = [model.score.remote(request) for request in requests]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [_unwrap(r) if isinstance(r, BaseException) else r for r in results]

    return score


def _unwrap(error: BaseException) -> BaseException:
    """The engine's own error inside Ray's wrapper, so failures are recorded by their real name."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return EngineError(f"{type(error).__name__}: {error}")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512,
                  health_check_timeout_s=60)
@serve.ingress(api)
class Ingress:
    """The HTTP front: owns the DuckDB store and runs jobs in the background."""

    async def __init__(self, model: DeploymentHandle, settings: dict):
        parsed = Settings(**settings)
        configure_logging(parsed.log_level)
        engine = await model.info.remote()
        store = Store(parsed.db_path, export_dir=parsed.export_dir)
        runner = JobRunner(store, handle_scorer(model), engine, batch_size=parsed.batch_size,
                           model_input_chars=parsed.model_input_chars, workers=parsed.job_workers)
        resumed = runner.resume()
        if resumed:
            log.warning("resuming unfinished jobs", extra={"jobs": resumed})
        self._context = Context(parsed, store, runner)
        attach(self._context)

    async def __del__(self):
        """Graceful stop (Serve calls this): stop labelling between batches, then release the file."""
        attach(None)
        await self._context.runner.close()
        self._context.store.close()


def build(args: dict | None = None) -> serve.Application:
    """Application builder: settings from ANNOTATE_* variables, overridden by ``args``."""
    settings = Settings(**(args or {}))
    for name in ("data_dir", "input_dir", "models_dir"):  # replicas may not share the caller's working dir
        setattr(settings, name, getattr(settings, name).resolve())
    dumped = settings.model_dump(mode="json")
    return Ingress.bind(ModelServer.bind(dumped), dumped)
