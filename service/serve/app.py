"""The Ray Serve application: a FastAPI ingress that owns the store, and a model deployment.

    HTTP ─▶ Ingress (1 replica: FastAPI routes, DuckDB store, job runner)
                │  DeploymentHandle, one call per document      ▲ shards registered
                ▼                                               │
            ModelServer-<name>, one deployment per model   ◀── Ray Data tasks (batch jobs,
            (engine; @serve.batch gathers concurrent calls)     ``service.work.batch``)

The ingress is the single DuckDB owner (DESIGN.md), so it runs exactly one replica;
the model deployment can be scaled out. ``build`` is the application builder named by
``deploy/serve-cpu.yaml`` (``serve run deploy/serve-cpu.yaml``) and used by ``annotate serve``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, OutOfMemoryError, RayActorError
from ray.serve import Deployment
from ray.serve.handle import DeploymentHandle

from service.api.context import Context, attach
from service.api.token_store import TokenStore
from service.engines import EngineInfo, ModelSpec, Reader, ScoreRequest, create_engine, load_models
from service.errors import cause_of
from service.labelling.scoring import PromptReading
from service.logs import configure_logging
from service.serve.http import create_api
from service.serve.metrics import ModelStats
from service.settings import Settings
from service.store import Store
from service.work.batch import BatchRunner
from service.work.inductions import InductionRunner
from service.work.jobs import JobRunner
from service.work.panels import Model
from service.work.trainings import ClassifierRunner

if TYPE_CHECKING:
    from service.distill.students import Predictor

api = create_api()
log = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, health_check_timeout_s=60)
class ModelServer:
    """Hosts one named model's engine, batches concurrent score calls, and counts its work."""

    def __init__(self, settings: dict, name: str, spec: dict):
        parsed = Settings(**settings)
        configure_logging(parsed.log_level)
        model_spec = ModelSpec(**spec)
        self.name = name
        self.engine = create_engine(model_spec, parsed)
        # ray types @serve.batch as returning the plain method, without the setters its wrapper has
        self._score_batch.set_max_batch_size(model_spec.max_batch or parsed.engine_max_batch)  # type: ignore[attr-defined]
        self._score_batch.set_batch_wait_timeout_s(parsed.engine_batch_wait_s)  # type: ignore[attr-defined]
        self.stats = ModelStats(name)

    async def __del__(self):
        """Release what the engine holds open (the OpenAI engine's pooled connections)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            await close()

    def info(self) -> EngineInfo:
        """Identity of the engine, recorded on every annotation."""
        return self.engine.info

    def reads(self) -> bool:
        """Whether the engine can read prompts into vectors (``Reader``: the embedded engine)."""
        return isinstance(self.engine, Reader)

    async def read(self, requests: list[ScoreRequest]) -> list[list[list[float]]]:
        """The model's reading of each prompt (the refinement's other views), outside the scoring batches and counts;
        called only where ``reads`` said it can."""
        return await cast(Reader, self.engine).read(requests)

    def report(self) -> dict:
        """Queue depth and throughput of this replica (also exported as Ray metrics)."""
        prefill = getattr(self.engine, "prefill", None)  # servers behind the OpenAI engine: prompt tokens computed
        return {**self.stats.report(), **(prefill.report() if prefill is not None else {})}

    async def generate_json(self, system: str, user: str, schema: dict, max_tokens: int = 256) -> dict:
        """Free-form output constrained to a JSON schema (taxonomy induction)."""
        return await self.engine.generate_json(system, user, schema, max_tokens=max_tokens)

    async def score(self, request: ScoreRequest) -> list[float]:
        """Score one document; concurrent callers are gathered into batches."""
        with self.stats.waiting():
            return await self._score_batch(request)

    async def score_many(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Score a batch a caller already formed (Ray Data shards), bypassing Serve's batching."""
        with self.stats.waiting(len(requests)):
            return await self._timed(requests)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Score a batch gathered from concurrent callers."""
        return await self._timed(requests)

    async def _timed(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Run the engine on a batch and record it."""
        with self.stats.busy(len(requests)):
            return await self.engine.score(requests)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, health_check_timeout_s=60)
class StudentServer:
    """Serves distilled classifiers: loads each from its directory once (the last few kept) and predicts."""

    def __init__(self, settings: dict):
        configure_logging(Settings(**settings).log_level)
        self._loaded: dict[str, Predictor] = {}

    def predict(self, path: str, texts: list[str]) -> dict:
        """Class probabilities of each text, with the classes in column order."""
        from service.distill.students import load_student

        if path not in self._loaded:
            if len(self._loaded) >= STUDENTS_KEPT:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[path] = load_student(Path(path))
        student = self._loaded[path]
        return {"classes": [str(c) for c in student.classes_], "probs": student.predict_proba(texts).tolist()}


STUDENTS_KEPT = 8  # students a replica keeps loaded


def handle_scorer(model: DeploymentHandle):
    """A job-runner scorer that sends each request as its own call, so Serve batches them."""

    async def score(requests: list[ScoreRequest]) -> list:
        results = await asyncio.gather(*(_outliving_replicas(model, request) for request in requests),
                                       return_exceptions=True)
        return [cause_of(r) if isinstance(r, BaseException) else r for r in results]

    return score


def handle_reader(model: DeploymentHandle) -> PromptReading:
    """The model's reading of prompts, for a caller off the event loop (the job runner's aggregation thread).

    None, with a warning, when it cannot read them (a replica lost or stuck): the refinement then reads with
    the encoder alone rather than failing the job's aggregation.
    """

    def read(requests: list[ScoreRequest]) -> np.ndarray | None:
        try:
            return np.array([vectors for start in range(0, len(requests), READ_CALL)
                             for vectors in model.read.remote(requests[start:start + READ_CALL]).result(
                                 timeout_s=READ_CALL_TIMEOUT_S)])
        except Exception as exc:  # whatever Ray raises (actor died, timeout): the caller goes on without the reading
            log.warning("the model could not read the documents; refining on the encoder's vectors alone",
                        extra={"error": str(exc)})
            return None

    return read


READ_CALL = 64  # prompts per call: a large job's reading travels in parts, each at most 64 documents' work
READ_CALL_TIMEOUT_S = 600  # a part that takes longer has met a stuck replica (measured: about 0.4 s per speech)
REPLICA_WAITS_S = (0.5, 1, 2) + (4,) * 30  # about two minutes: a restart reloads the weights
REPLICA_DEATHS = 5  # a document that kills its replica this often is failed, not retried forever


async def _outliving_replicas(model: DeploymentHandle, request: ScoreRequest):
    """Score one request; when its replica dies or restarts, wait for Serve's new one and ask again.

    A replica restarting (``ActorUnavailableError``) is waited out; one dying under this very
    request (``RayActorError``, Ray's ``OutOfMemoryError``) is retried ``REPLICA_DEATHS`` times,
    so a document that crashes the engine ends failed instead of taking replicas down for minutes.
    """
    deaths = 0
    for wait_s in REPLICA_WAITS_S:
        try:
            return await model.score.remote(request)
        except ActorUnavailableError:
            pass
        except (RayActorError, OutOfMemoryError):
            deaths += 1
            if deaths >= REPLICA_DEATHS:
                raise
        log.warning("model replica gone; retrying", extra={"deaths": deaths, "wait_s": wait_s})
        await asyncio.sleep(wait_s)
    return await model.score.remote(request)


def handle_generator(model: DeploymentHandle):
    """An induction generator that asks the model deployment for schema-constrained JSON."""

    async def generate(system: str, user: str, schema: dict, *, max_tokens: int = 256) -> dict:
        try:
            return await model.generate_json.remote(system, user, schema, max_tokens)
        except Exception as exc:  # Ray's wrapper hides the engine's own error
            raise cause_of(exc) from None

    return generate


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512,
                  health_check_timeout_s=60)
@serve.ingress(api)
class Ingress:
    """The HTTP front: owns the DuckDB store and runs jobs in the background."""

    # Ray Serve awaits an async constructor, which the type system has no notion of
    async def __init__(self, models: dict[str, DeploymentHandle], students: DeploymentHandle,  # type: ignore[misc]
                       default_model: str, settings: dict):
        parsed = Settings(**settings)
        configure_logging(parsed.log_level)
        infos = await asyncio.gather(*(handle.info.remote() for handle in models.values()))
        reads = await asyncio.gather(*(handle.reads.remote() for handle in models.values()))
        named = {name: Model(name, handle_scorer(handle), info, handle_reader(handle) if can else None)
                 for (name, handle), info, can in zip(models.items(), infos, reads)}
        store = Store(parsed.db_path, export_dir=parsed.export_dir)
        batch = BatchRunner(store, parsed, {name: handle.deployment_name for name, handle in models.items()},
                            app_name=serve.get_replica_context().app_name)
        runner = JobRunner(store, named, default_model, batch_size=parsed.batch_size,
                           model_input_chars=parsed.model_input_chars, workers=parsed.job_workers, batch_runner=batch,
                           students=students, max_scored_labels=parsed.max_scored_labels,
                           embedding_model_dir=parsed.embedding_model_dir)
        resumed = runner.resume()
        if resumed:
            log.warning("resuming unfinished jobs", extra={"jobs": resumed})
        interrupted = store.inductions.interrupt() + store.classifiers.interrupt()  # both, always
        if interrupted:
            log.warning("inductions or trainings interrupted by the last stop were marked failed")
        generators = {name: handle_generator(handle) for name, handle in models.items()}
        self._context = Context(parsed, store, runner, models, InductionRunner(store, generators, runner),
                                ClassifierRunner(store, parsed), students, TokenStore(parsed.data_dir / "tokens.sqlite"))
        attach(self._context)

    async def __del__(self):
        """Graceful stop (Serve calls this): stop labelling between batches, then release the file."""
        attach(None)
        await self._context.inductions.close()
        await self._context.classifiers.close()
        await self._context.runner.close()
        self._context.store.close()
        self._context.tokens.close()


def build(args: dict | None = None) -> serve.Application:
    """Application builder: settings from ANNOTATE_* variables, overridden by ``args``; one ModelServer per model."""
    settings = Settings(**(args or {}))
    # replicas may not share the caller's working dir
    for name in ("data_dir", "input_dir", "models_dir", "models_file", "embedding_model_dir"):
        if getattr(settings, name) is not None:
            setattr(settings, name, getattr(settings, name).resolve())
    config = load_models(settings)
    dumped = settings.model_dump(mode="json")
    # @serve.deployment made each class a Deployment; mypy keeps a decorated class's own type
    model_server, student_server, ingress = (cast(Deployment, cls) for cls in (ModelServer, StudentServer, Ingress))
    models = {name: model_server.options(name=f"ModelServer-{name}", num_replicas=spec.replicas)
              .bind(dumped, name, spec.model_dump()) for name, spec in config.models.items()}
    return ingress.bind(models, student_server.bind(dumped), config.default, dumped)
