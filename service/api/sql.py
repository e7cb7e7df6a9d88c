"""The user SQL route: one read-only statement in the sandbox, on threads of its own, under per-token limits."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

from fastapi import APIRouter, Request

from service.api.auth import READ, caller_of
from service.api.context import hosted
from service.api.schemas import (
    SqlRequest,
    SqlResponse,
)
from service.api.security import OPERATOR, Caller
from service.errors import (
    TooManyRequests,
)
from service.store import Store
from service.store.sandbox import SqlResult, run_sql

router = APIRouter(tags=["sql"])

_SQL_RUNNING: Counter[str | None] = Counter()  # token id -> its user SQL queries admitted and not yet ended


_SQL_RUNNING_LOCK = threading.Lock()  # slots are released on SQL threads


_SQL_SPARE_THREADS = 2  # shared SQL threads beyond one token's limit


@router.post("/v1/sql", dependencies=[READ], response_model=SqlResponse)
async def query_sql(request: Request, body: SqlRequest) -> SqlResponse:
    """Run one read-only SQL statement in the sandbox, under limits a request may only lower."""
    ctx = hosted(request)
    settings = ctx.settings
    timeout = min(body.timeout_s or settings.sql_timeout_s, settings.sql_timeout_s)
    max_rows = min(body.max_rows or settings.sql_max_rows, settings.sql_max_rows)
    max_bytes = min(body.max_bytes or settings.sql_max_bytes, settings.sql_max_bytes)
    call = functools.partial(_run_sql_on_thread, ctx.store, body.sql, timeout_s=timeout, max_rows=max_rows,
                             max_bytes=max_bytes)
    future = _submit_sql(caller_of(request), settings.sql_max_concurrent_per_token, call)
    return SqlResponse(**vars(await asyncio.wrap_future(future)))


def _run_sql_on_thread(store: Store, sql: str, **limits) -> SqlResult:
    """The sandbox on a cursor made on the thread that uses it."""
    return run_sql(store.cursor(), sql, **limits)


def _submit_sql(caller: Caller, limit: int, call) -> Future:
    """Start ``call`` on the caller's SQL threads, or TooManyRequests when the caller already runs ``limit`` queries.

    The operator (token id ``OPERATOR``) has ``limit`` threads of its own and may run no more than ``limit``
    queries, so its queries never wait behind any other token's. Every other token (the tokenless loopback
    caller counts as one) shares ``limit + _SQL_SPARE_THREADS`` threads, so one token alone never holds them
    all; none of them takes a thread from jobs. A slot is freed when the query ends, not when the request
    does, so a client that hangs up cannot run more than its limit.
    """
    with _SQL_RUNNING_LOCK:
        running = _SQL_RUNNING[caller.token_id]
        if running >= limit:
            who = f"token {caller.token_id}" if caller.token_id else "the caller without a token"
            raise TooManyRequests(f"{who} already runs {running} SQL queries, the limit "
                                  f"(ANNOTATE_SQL_MAX_CONCURRENT_PER_TOKEN) is {limit}; retry when one has ended")
        _SQL_RUNNING[caller.token_id] += 1
    operator = caller.token_id == OPERATOR
    threads = _sql_threads("operator" if operator else "shared", limit if operator else limit + _SQL_SPARE_THREADS)
    future = threads.submit(call)
    future.add_done_callback(functools.partial(_release_sql, caller.token_id))
    return future


def _release_sql(token_id: str | None, _done: Future) -> None:
    """Free a caller's SQL slot once its query has ended (or was cancelled before it began)."""
    with _SQL_RUNNING_LOCK:
        _SQL_RUNNING[token_id] -= 1


@functools.cache
def _sql_threads(owner: str, workers: int) -> ThreadPoolExecutor:
    """The operator's or the shared user SQL threads, made once per size the settings give."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"user-sql-{owner}")
