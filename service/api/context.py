"""The state the HTTP routes share in the process that hosts the app (the ingress replica)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from service.api.security import FailureCounter
from service.api.token_store import TokenStore
from service.errors import EngineUnavailable, PayloadTooLarge
from service.settings import Settings
from service.store import Store
from service.work.inductions import InductionRunner
from service.work.jobs import JobRunner
from service.work.trainings import ClassifierRunner

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


@dataclass
class Context:
    """What the routes need; ``attach`` sets it in the process that hosts the app."""

    settings: Settings
    store: Store
    runner: JobRunner
    models: dict  # model name -> its ModelServer deployment handle
    inductions: InductionRunner
    classifiers: ClassifierRunner
    students: DeploymentHandle  # the StudentServer's
    tokens: TokenStore
    auth_failures: FailureCounter = field(init=False)

    def __post_init__(self):
        """Failed tokens are counted per client address in the process that checks them."""
        self.auth_failures = FailureCounter(self.settings.auth_failures_per_minute)


_hosted: Context | None = None


def attach(context: Context | None) -> None:
    """Make ``context`` the one the routes of this process use (Serve copies the app, not its state)."""
    global _hosted
    _hosted = context


async def read_upload(request: Request, what: str) -> bytes:
    """A body parsed in Python (YAML, CSV, JSON of labels), read only up to ``ANNOTATE_MAX_UPLOAD_BYTES``."""
    limit, body = hosted(request).settings.max_upload_bytes, bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"{what} over the limit of {limit:,} bytes (ANNOTATE_MAX_UPLOAD_BYTES)")
    return bytes(body)


def hosted(request: Request) -> Context:
    """The hosting context of this process."""
    if _hosted is None:
        raise EngineUnavailable("the service is still starting; retry in a moment")
    return _hosted
