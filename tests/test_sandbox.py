"""The SQL sandbox on a real store: a list of good queries and a list of hostile ones."""

from __future__ import annotations

import json

import pytest

from service.errors import PayloadTooLarge, SqlRejected, SqlTimeout
from service.store import Store
from service.store.sandbox import check_sql, run_sql

MAX_BYTES = 1_000_000
GOOD = [
    "SELECT 1 AS one",
    "select count(*) from jobs",
    "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
    "FROM taxonomies",
    "VALUES (1), (2)",
    "DESCRIBE annotations",
    "SHOW TABLES",
    "SUMMARIZE jobs",
    "SELECT * FROM labels LIMIT 3",
    "SELECT map_keys(distribution) FROM annotations",
    "SELECT 1 UNION ALL SELECT 2",
]

HOSTILE = [
    ("INSERT INTO jobs (job_id) VALUES ('x')", "INSERT"),
    ("UPDATE jobs SET status = 'failed'", "UPDATE"),
    ("DELETE FROM annotations", "DELETE"),
    ("DROP TABLE jobs", "DROP"),
    ("CREATE TABLE evil (a INT)", "CREATE"),
    ("ALTER TABLE jobs ADD COLUMN x INT", "ALTER"),
    ("COPY jobs TO '/tmp/leak.csv'", "COPY"),
    ("EXPORT DATABASE '/tmp/dump'", "EXPORT"),
    ("ATTACH '/tmp/other.duckdb'", "ATTACH"),
    ("DETACH memory", "DETACH"),
    ("INSTALL httpfs", "LOAD statements are not allowed"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("RESET lock_configuration", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("CALL dbgen(sf = 1)", "CALL"),
    ("CHECKPOINT", "CALL statements are not allowed"),
    ("BEGIN TRANSACTION", "TRANSACTION"),
    ("EXPLAIN ANALYZE DELETE FROM jobs", "EXPLAIN"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELECT * FROM read_csv('/etc/passwd')", "not allowed"),
    ("SELECT * FROM read_text('/etc/hostname')", "not allowed"),
    ("SELECT * FROM read_parquet('/tmp/x.parquet')", "not allowed"),
    ("SELECT * FROM 'http://example.com/x.csv'", "not allowed"),
    ("SELECT * FROM glob('/*')", "not allowed"),
    ("", "empty SQL"),
    ("SELEC 1", "does not parse"),
]


@pytest.fixture
def store(tmp_path) -> Store:
    """A real, locked-down store in a temp dir."""
    return Store(tmp_path / "db.duckdb", export_dir=tmp_path / "exports")


@pytest.mark.parametrize("query", GOOD)
def test_good_queries_run(store, query):
    """Read-only queries are accepted and answered."""
    result = run_sql(store.cursor(), query, timeout_s=5, max_rows=100, max_bytes=MAX_BYTES)
    assert isinstance(result.columns, list) and result.truncated is False


@pytest.mark.parametrize(("query", "fragment"), HOSTILE)
def test_hostile_queries_are_refused(store, query, fragment):
    """Writes, file and network access, configuration changes and stacked statements are refused."""
    with pytest.raises(SqlRejected) as caught:
        run_sql(store.cursor(), query, timeout_s=5, max_rows=100, max_bytes=MAX_BYTES)
    assert fragment in str(caught.value)
    assert store.cursor().execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_runaway_query_is_interrupted(store):
    """A query that would run forever stops at the time limit, and the store still answers."""
    with pytest.raises(SqlTimeout):
        run_sql(store.cursor(), "SELECT count(*) FROM range(1000000000) a, range(1000000000) b",
                timeout_s=0.5, max_rows=10, max_bytes=MAX_BYTES)
    assert run_sql(store.cursor(), "SELECT 2", timeout_s=5, max_rows=10, max_bytes=MAX_BYTES).rows == [[2]]


def test_row_cap_detected_by_fetching_one_more(store):
    """Exactly max_rows rows is not truncated; one more is."""
    exact = run_sql(store.cursor(), "SELECT * FROM range(5)", timeout_s=5, max_rows=5, max_bytes=MAX_BYTES)
    over = run_sql(store.cursor(), "SELECT * FROM range(6)", timeout_s=5, max_rows=5, max_bytes=MAX_BYTES)
    assert (len(exact.rows), exact.truncated, exact.truncated_reason) == (5, False, None)
    assert (len(over.rows), over.truncated) == (5, True)
    assert "ANNOTATE_SQL_MAX_ROWS" in over.truncated_reason


def test_byte_cap_cuts_the_answer_and_says_so(store):
    """Rows stop before max_bytes of JSON, however many the row cap allows, and the answer names the byte cap."""
    wide = "SELECT i, s FROM range(100_000) t(i), (SELECT string_agg('x', '') AS s FROM range(200))"
    result = run_sql(store.cursor(), wide, timeout_s=5, max_rows=100_000, max_bytes=10_000)
    assert result.truncated and "ANNOTATE_SQL_MAX_BYTES" in result.truncated_reason
    assert 9_000 < len(json.dumps(result.rows, separators=(",", ":"))) <= 10_000


def test_a_single_row_over_the_byte_cap_is_too_large(store):
    """A row that alone is over max_bytes is refused (413) naming the setting, not returned in part."""
    huge = "SELECT s FROM (SELECT string_agg('x', '') AS s FROM range(20_000)), range(20)"
    with pytest.raises(PayloadTooLarge, match="ANNOTATE_SQL_MAX_BYTES"):
        run_sql(store.cursor(), huge, timeout_s=5, max_rows=100, max_bytes=10_000)
    assert run_sql(store.cursor(), huge, timeout_s=5, max_rows=100, max_bytes=MAX_BYTES).truncated is False


def test_exports_dir_is_readable(store, tmp_path):
    """Parquet exports under the data dir's exports folder can be queried."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "exports" / "x.parquet")
    result = run_sql(store.cursor(), f"SELECT sum(a) FROM read_parquet('{tmp_path}/exports/x.parquet')",
                     timeout_s=5, max_rows=10, max_bytes=MAX_BYTES)
    assert result.rows == [[3]]


def test_check_sql_returns_the_statement():
    """check_sql hands back the single statement it accepted."""
    assert check_sql("SELECT 1;").startswith("SELECT 1")


def test_interrupt_keeps_firing_until_the_query_stops(store):
    """Even a limit shorter than query start-up stops a runaway query (the watchdog re-interrupts)."""
    with pytest.raises(SqlTimeout):
        run_sql(store.cursor(), "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r",
                timeout_s=0.000001, max_rows=10, max_bytes=MAX_BYTES)


def test_timestamptz_values_are_returned(store):
    """now() returns a time-zone aware timestamp as ISO text."""
    assert "T" in run_sql(store.cursor(), "SELECT now() AS t", timeout_s=5, max_rows=1, max_bytes=MAX_BYTES).rows[0][0]
