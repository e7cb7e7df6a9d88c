"""User SQL, guarded in one place and in layers.

1. Only a single read statement (``SELECT``, which covers WITH, VALUES, FROM-first,
   DESCRIBE, SHOW and SUMMARIZE) is accepted; anything else is refused with the reason.
2. It runs on a cursor of the store's instance, which ``Store`` has locked down: no
   file access outside the exports dir, no network, no extension installs, and its
   configuration cannot be changed.
3. A watchdog interrupts it at the time limit, again and again until it stops (a request
   may lower the limit, never raise it, and never below 0.1 s).
4. At most ``max_rows`` rows are returned; fetching one more tells whether it was cut.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from uuid import UUID

import duckdb

from .errors import SqlRejected, SqlTimeout

ALLOWED = {duckdb.StatementType.SELECT}


@dataclass
class SqlResult:
    """Columns, rows as JSON-ready lists, and whether the row cap cut the answer."""

    columns: list[str]
    rows: list[list]
    truncated: bool
    elapsed_ms: float


def check_sql(sql: str) -> str:
    """Return the one read statement in ``sql`` or raise SqlRejected saying why not."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlRejected(f"SQL does not parse: {exc}") from exc
    if not statements:
        raise SqlRejected("empty SQL; send one SELECT statement")
    if len(statements) > 1:
        raise SqlRejected(f"send one statement at a time, got {len(statements)}")
    statement = statements[0]
    if statement.type not in ALLOWED:
        kind = statement.type.name
        raise SqlRejected(f"{kind} statements are not allowed: SQL access is read-only (SELECT, WITH, DESCRIBE, SHOW)")
    return statement.query


def run_sql(cursor: duckdb.DuckDBPyConnection, sql: str, *, timeout_s: float, max_rows: int) -> SqlResult:
    """Run a checked statement under the time limit and the row cap."""
    query = check_sql(sql)
    finished = threading.Event()
    watchdog = threading.Thread(target=_interrupt_after, args=(cursor, timeout_s, finished), daemon=True)
    started = time.perf_counter()
    watchdog.start()
    try:
        cursor.execute(query)
        columns = [d[0] for d in cursor.description or []]
        rows = cursor.fetchmany(max_rows + 1)
    except duckdb.InterruptException as exc:
        raise SqlTimeout(f"query ran past its time limit of {timeout_s:g} s and was stopped") from exc
    except duckdb.PermissionException as exc:
        raise SqlRejected(f"not allowed: {exc}; SQL may read the service's tables only") from exc
    except duckdb.Error as exc:
        raise SqlRejected(f"{type(exc).__name__}: {exc}") from exc
    finally:
        finished.set()
        watchdog.join()
        cursor.close()
    return SqlResult(
        columns=columns,
        rows=[[_jsonable(v) for v in row] for row in rows[:max_rows]],
        truncated=len(rows) > max_rows,
        elapsed_ms=1000 * (time.perf_counter() - started),
    )


def _interrupt_after(cursor: duckdb.DuckDBPyConnection, timeout_s: float, finished: threading.Event) -> None:
    """After the deadline, interrupt until the query returns (an interrupt that lands before it starts is lost)."""
    if finished.wait(timeout_s):
        return
    while not finished.is_set():
        cursor.interrupt()
        finished.wait(0.05)


def _jsonable(value):
    """DuckDB values to JSON types: maps to objects, times to ISO text, decimals to floats."""
    if isinstance(value, dict):
        if set(value) == {"key", "value"} and isinstance(value["key"], list):
            return {str(k): _jsonable(v) for k, v in zip(value["key"], value["value"])}
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (UUID, bytes)):
        return value.hex() if isinstance(value, bytes) else str(value)
    return value
