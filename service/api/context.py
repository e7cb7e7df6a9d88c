"""The state the HTTP routes share in the process that hosts the app (the ingress replica)."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import StreamingResponse

from service.api.security import FailureCounter
from service.api.token_store import TokenStore
from service.errors import EngineUnavailable, PayloadTooLarge, TooManyRequests
from service.files import download_path
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


DOWNLOAD_CHUNK = 1 << 20
T = TypeVar("T")


async def built(directory: Path, suffix: str, build: Callable[[Path], None]) -> Path:
    """A fresh download file (``download_path``) that ``build`` wrote on a worker thread; removed if the build fails or
    its request is cancelled."""
    path = download_path(directory, suffix)
    try:
        await asyncio.to_thread(build, path)
    except BaseException:
        path.unlink(missing_ok=True)  # a cancelled build's thread may still be writing: to an unlinked file
        raise
    return path


def sent_once(path: Path, media_type: str, filename: str) -> StreamingResponse:
    """A built download (``built``) streamed from an open handle, its file unlinked
    at once: the disk space returns when the handle closes, whether the client reads to the end or hangs up midway (a
    file deleted after a completed send stayed behind for every client that left early)."""
    handle = path.open("rb")
    try:
        size = os.fstat(handle.fileno()).st_size
    finally:
        path.unlink(missing_ok=True)

    def chunks() -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(DOWNLOAD_CHUNK):
                yield chunk

    return StreamingResponse(chunks(), media_type=media_type, headers={
        "content-length": str(size), "content-disposition": f"attachment; filename*=utf-8''{quote(filename)}"})


class OneAtATime:
    """Per token, one run of an operation that takes minutes at a time; a second while it runs is a 429.

    Such work runs on the ingress's threads, which every route and the token lookup share: a few
    callers each starting many would hold them all. The run is shielded from the request's
    cancellation (a client that hangs up, a proxy timeout) and holds the token's turn until it
    has really finished: a thread cannot be stopped, so a turn freed at the cancellation would
    let a caller that hangs up and asks again start run after run.
    """

    def __init__(self, what: str):
        self.what = what
        self._locks: defaultdict[str | None, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def run(self, token_id: str | None, work: Coroutine[Any, Any, T]) -> T:
        """``work``'s result, as this token's one run, or a 429 (``work`` is then never started)."""
        lock = self._locks[token_id]
        if lock.locked():
            work.close()
            raise TooManyRequests(f"{self.what} of this token is running; wait for its answer before starting another")
        await lock.acquire()  # free: no other run of this token can start between the check and here
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda _: lock.release())
        return await asyncio.shield(task)
