"""User SQL, guarded in one place and in layers.

1. Only a single read statement (``SELECT``, which covers WITH, VALUES, FROM-first,
   DESCRIBE, SHOW and SUMMARIZE) is accepted; anything else is refused with the reason.
2. Calls that no limit can stop, that run SQL the checks never see, or that change the
   database's state are refused, found in DuckDB's own parse tree (see ``UNBOUNDED``,
   ``HIDDEN_SQL`` and ``STATEFUL``).
3. It runs in a read-only transaction, since a SELECT may still write through a
   data-modifying CTE (``WITH x AS (DELETE FROM jobs RETURNING *) SELECT ...``).
4. It runs on a cursor of the store's instance, which ``Store`` has locked down: no
   file access outside the exports dir, no network, no extension installs, a memory
   limit, and its configuration cannot be changed.
5. A watchdog interrupts it at the time limit, again and again until it stops (a request
   may lower the limit, never raise it, and never below 0.1 s).
6. At most ``max_rows`` rows and ``max_bytes`` bytes of JSON are returned. Rows are fetched
   one at a time and measured as they are converted (a chunk of many rows could repeat one
   huge value DuckDB holds once), so memory stays within the cap plus one row; fetching one
   more row tells whether the row cap cut the answer, and a single row over the byte cap
   is refused (413).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from uuid import UUID

import duckdb

from service.errors import PayloadTooLarge, SqlRejected, SqlTimeout

ALLOWED = {duckdb.StatementType.SELECT}
# Scalar functions one call of which builds a value as large as a number argument asks
# (repeat('x', 2000000000), range(0, 10^9), lpad, printf('%2000000000d'), bitstring('1', 2000000000)), or as large as
# its input times another argument's length (replace(s, 'x', s): quadratic, and nested calls
# multiply), or a fixed multiple of its input (hex: 2, bin: 8, regexp_escape: 2) that nested
# calls compound, in memory DuckDB neither interrupts midway nor counts against its limit
# (measured on DuckDB 2.0 with a 200 MB limit: three nested replace() calls took 1 GB, nine
# nested hex() calls over a 1 MB string 1 GB, five nested bin() 4.5 GB; concat, url_encode,
# to_base64 and to_json stay within the limit and are allowed).
# Lambda functions (and the list comprehensions that parse into them) build their results
# outside the memory limit too, and nest: three levels over an 800-element list reached
# 10 GB against a 5.8 GB limit and ran past the time limit (second security review).
LAMBDAS = {"list_transform", "array_transform", "list_apply", "array_apply", "apply", "list_filter", "array_filter",
           "filter", "list_reduce", "array_reduce", "reduce"}
UNBOUNDED = {"repeat", "lpad", "rpad", "printf", "format", "range", "generate_series", "list_resize", "array_resize",
             "replace", "regexp_replace", "hex", "to_hex", "bin", "to_binary", "regexp_escape", "bitstring", *LAMBDAS}
# Table functions, their views and the scalar that show the server's paths (data dir, temp dir,
# allowed directories) and nothing a query over the service's tables needs.
REVEALING = {"duckdb_settings", "duckdb_databases", "duckdb_temporary_files", "current_setting", "pragma_database_list"}
# Table functions that run SQL, or read a table, named in text or in a serialized tree, which the checks here never
# see (query_table('duckdb_databases') reads a view REVEALING refuses by name).
HIDDEN_SQL = {"query", "query_table", "json_execute_serialized_sql"}
# Table functions that write or change state: the read-only transaction lets a checkpoint and log truncation
# through, the locked configuration stops the others with a less clear message (see duckdb_functions()).
STATEFUL = {"checkpoint", "force_checkpoint", "truncate_duckdb_logs", "enable_logging", "disable_logging",
            "enable_profiling", "disable_profiling", "create_external_resource", "destroy_external_resource",
            "register_external_resource", "register_external_resource_type", "deregister_external_resource"}


@dataclass
class SqlResult:
    """Columns, rows as JSON-ready lists, and whether a cap cut the answer (``truncated_reason`` says which)."""

    columns: list[str]
    rows: list[list]
    truncated: bool
    truncated_reason: str | None
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


def run_sql(cursor: duckdb.DuckDBPyConnection, sql: str, *, timeout_s: float, max_rows: int,
            max_bytes: int) -> SqlResult:
    """Run a checked statement in a read-only transaction under the time limit, the row cap and the byte cap."""
    query = check_sql(sql)
    finished = threading.Event()
    watchdog = threading.Thread(target=_interrupt_after, args=(cursor, timeout_s, finished), daemon=True)
    started = time.perf_counter()
    watchdog.start()
    try:
        cursor.execute("BEGIN TRANSACTION READ ONLY")
        _refuse_calls(cursor, query)
        cursor.execute(query)
        columns = [d[0] for d in cursor.description or []]
        rows, truncated_reason = _fetch(cursor, max_rows=max_rows, max_bytes=max_bytes)
    except duckdb.InterruptException as exc:
        raise SqlTimeout(f"query ran past its time limit of {timeout_s:g} s and was stopped") from exc
    except duckdb.PermissionException as exc:
        raise SqlRejected(f"not allowed: {exc}; SQL may read the service's tables only") from exc
    except duckdb.TransactionException as exc:
        raise SqlRejected(f"not allowed: SQL access is read-only and this query writes ({exc})") from exc
    except duckdb.OutOfMemoryException as exc:
        reason = str(exc).splitlines()[0]
        raise SqlRejected(f"{reason}: the query needs more memory than the SQL sandbox allows; "
                          "filter or aggregate more, or add a LIMIT") from exc
    except duckdb.Error as exc:
        raise SqlRejected(f"{type(exc).__name__}: {exc}") from exc
    finally:
        finished.set()
        watchdog.join()
        cursor.close()
    return SqlResult(columns=columns, rows=rows, truncated=truncated_reason is not None,
                     truncated_reason=truncated_reason, elapsed_ms=1000 * (time.perf_counter() - started))


def _fetch(cursor: duckdb.DuckDBPyConnection, *, max_rows: int, max_bytes: int) -> tuple[list[list], str | None]:
    """JSON-ready rows until the answer ends or a cap cuts it, and which cap did (None: the whole answer)."""
    rows: list[list] = []
    size = 2  # the list's brackets
    while (raw := cursor.fetchone()) is not None:
        if len(rows) == max_rows:
            return rows, f"row cap: {max_rows:,} rows (max_rows; at most ANNOTATE_SQL_MAX_ROWS)"
        row = [_jsonable(v) for v in raw]
        row_bytes = len(json.dumps(row, default=str, separators=(",", ":"))) + 1  # and its comma
        if row_bytes > max_bytes:
            raise PayloadTooLarge(f"row {len(rows) + 1} alone is {row_bytes:,} bytes as JSON, over the reply cap of "
                                  f"{max_bytes:,} bytes (max_bytes; at most ANNOTATE_SQL_MAX_BYTES); select fewer or "
                                  "shorter columns, e.g. left(text, 1000)")
        if size + row_bytes > max_bytes:
            return rows, f"byte cap: {max_bytes:,} bytes of JSON (max_bytes; at most ANNOTATE_SQL_MAX_BYTES)"
        rows.append(row)
        size += row_bytes
    return rows, None


def _refuse_calls(cursor: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse UNBOUNDED, HIDDEN_SQL and STATEFUL calls; the parse tree sees through quoting, schemas and dot syntax."""
    try:
        serialized = cursor.execute("SELECT json_serialize_sql(?)", [query]).fetchone()
        if serialized is None:  # a SELECT without FROM always returns one row
            raise SqlRejected("SQL cannot be checked: json_serialize_sql returned nothing")
        tree = json.loads(serialized[0])
        if tree["error"]:
            raise SqlRejected(f"SQL cannot be checked: {tree['error_message']}")
        calls = set(_function_calls(tree))
        tables = set(_table_names(tree))
    except RecursionError as exc:
        raise SqlRejected("SQL nests too deeply to be checked; write it with fewer nested expressions") from exc
    if hidden := sorted({name for name, in_from in calls if in_from and name in HIDDEN_SQL}):
        raise SqlRejected(f"{hidden[0]}() is not allowed: it runs SQL the sandbox cannot check; write that SQL directly")
    if revealing := sorted(({name for name, _ in calls} | tables) & REVEALING):
        raise SqlRejected(f"{revealing[0]}() is not allowed: it shows the server's configuration and paths")
    if stateful := sorted({name for name, in_from in calls if in_from and name in STATEFUL}):
        raise SqlRejected(f"{stateful[0]}() is not allowed: it changes the database's state, and SQL access is read-only")
    if unbounded := sorted({name for name, in_from in calls if not in_from and name in UNBOUNDED}):
        raise SqlRejected(f"{', '.join(unbounded)}() not allowed: one call can build a value of any size, which neither "
                          "the time limit nor the memory limit can stop (range and generate_series are fine in FROM; "
                          "instead of list lambdas and comprehensions, unnest the list and aggregate)")


def _function_calls(node, in_from: bool = False):
    """(name, is a table function in FROM) for every function call in a json_serialize_sql tree."""
    if isinstance(node, list):
        for child in node:
            yield from _function_calls(child)
    elif isinstance(node, dict):
        if node.get("class") == "FUNCTION":
            yield node["function_name"].lower(), in_from
        for key, child in node.items():
            yield from _function_calls(child, node.get("type") == "TABLE_FUNCTION" and key == "function")


def _table_names(node):
    """Every table or view named in a json_serialize_sql tree (``FROM duckdb_databases`` has no call)."""
    if isinstance(node, list):
        for child in node:
            yield from _table_names(child)
    elif isinstance(node, dict):
        if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
            yield node["table_name"].lower()
        for child in node.values():
            yield from _table_names(child)


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
