"""The models config: which engines and models the service labels with, chosen by name.

A models file (``deploy/models.yaml``; ``ANNOTATE_MODELS_FILE``) names every model a job
or taxonomy may ask for::

    default: smollm2
    models:
      smollm2: {engine: embedded}
      local-llama: {engine: openai, base_url: http://127.0.0.1:8080/v1, model: smollm2}

Without a file the service knows the two built-in models, ``embedded`` (SmolLM2 on the
CPU) and ``fake`` (word overlap, for tests and demos). Each model becomes its own
``ModelServer`` deployment, so models scale and fail independently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.engines.base import Engine
from service.errors import InvalidInput
from service.settings import Settings
from service.taxonomy import format_loc, yaml_line

EngineKind = Literal["embedded", "fake", "openai"]


class ModelSpec(BaseModel):
    """One named model: its engine and how to reach or run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    engine: EngineKind = Field(description="embedded (SmolLM2 on CPU), openai (any OpenAI-compatible server) or fake")
    model: str | None = Field(None, description="the served model's name (openai: the 'model' field of requests)")
    base_url: str | None = Field(None, description="openai: server URL up to /v1, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the API key")
    chat_format: str = Field("chatml", description="openai: how system/user messages become the prompt text")
    scoring: Literal["auto", "echo", "top_logprobs"] = Field(
        "auto", description="openai: auto (label tokens walked through top-k lists, prefix-cached, exact by echo "
                            "outside the top k), top_logprobs (the same walk, bounded outside the top k) or echo "
                            "(one uncached prefill per label)")
    top_logprobs: int = Field(20, ge=1, le=1000, description="openai: top log-probabilities asked per step "
                                                           "(OpenAI allows 5, vLLM 20 unless max_logprobs)")
    max_concurrency: int = Field(16, ge=1, description="openai: most requests in flight to the server")
    timeout_s: float = Field(60.0, gt=0, description="openai: per-request timeout")
    max_retries: int = Field(4, ge=0, description="openai: retries on 429, 5xx, timeouts and dropped connections")
    delay_ms: float = Field(0.0, ge=0, description="fake: simulated latency per scored document")
    replicas: int = Field(1, ge=1, description="ModelServer replicas hosting this model")
    max_batch: int | None = Field(None, ge=1, description="documents per batched call (default ANNOTATE_ENGINE_MAX_BATCH)")

    @model_validator(mode="after")
    def _server_fields(self) -> ModelSpec:
        """An openai model needs a URL and a model name."""
        if self.engine == "openai" and not (self.base_url and self.model):
            raise ValueError("an 'openai' model needs 'base_url' and 'model'")
        return self


class ModelsConfig(BaseModel):
    """Every model the service may use, and the default one."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    default: str = Field(description="the model used when neither the job nor its taxonomy names one")
    models: dict[str, ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _known_default(self) -> ModelsConfig:
        """The default must be one of the models."""
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not among the models: {', '.join(self.models)}")
        return self

    def resolve(self, name: str | None) -> str:
        """The model a job gets: its own choice if known, else the default."""
        if name is None:
            return self.default
        if name not in self.models:
            raise InvalidInput(f"unknown model {name!r}; the models config defines {', '.join(sorted(self.models))}")
        return name


BUILT_IN = ModelsConfig(default="embedded", models={"embedded": ModelSpec(engine="embedded"),
                                                    "fake": ModelSpec(engine="fake")})


def load_models(settings: Settings) -> ModelsConfig:
    """The models of ``settings.models_file`` (built-in ones without a file), default overridden by ``settings.model``."""
    config = BUILT_IN if settings.models_file is None else parse_models(settings.models_file)
    if settings.model is not None:
        config = config.model_copy(update={"default": config.resolve(settings.model)})
    return config


def parse_models(path: Path) -> ModelsConfig:
    """Read and validate a models file; problems name the file, line and field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"{path}: cannot read the models file: {exc}") from exc
    try:
        return ModelsConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            line = yaml_line(root, tuple(error["loc"])) if root is not None else None
            problems.append(f"{path}:{line or '?'}: {format_loc(error['loc']) or 'top level'}: {error['msg']}")
        raise InvalidInput("invalid models file:\n" + "\n".join(problems)) from exc


def create_engine(spec: ModelSpec, settings: Settings) -> Engine:
    """Build one model's engine; heavy imports happen only for the kind chosen."""
    if spec.engine == "embedded":
        from service.engines.embedded import EmbeddedEngine

        return EmbeddedEngine(settings.models_dir, threads=settings.engine_threads, dtype=settings.engine_dtype)
    if spec.engine == "openai":
        from service.engines.openai import OpenAIEngine

        return OpenAIEngine(spec)
    from service.engines.fake import FakeEngine

    return FakeEngine(delay_s=spec.delay_ms / 1000)
