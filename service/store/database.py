"""The database owner: the DuckDB connection, its lock-down, the write lock, transactions and the schema.

DuckDB allows one writer process, so exactly one ``Database`` (inside the service's ingress
replica, or the CLI when no service runs) holds the file. The repositories (``service.store``)
use it: each call takes a fresh cursor of the same instance, writes are serialised by one
lock, and bulk writes go through Arrow. User SQL goes through ``service.store.sandbox``, which
also runs on cursors of this instance, after ``_lock_down`` has closed file and network
access for the whole instance (DESIGN.md, "Known constraints").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from service.errors import AnnotateError
from service.vocabulary import IssueKind, JobState, SamplingDesign, StudentKind, values


def _in(alias: object) -> str:
    """A vocabulary's values as an SQL list, for the schema's CHECK constraints."""
    return "(" + ", ".join(f"'{value}'" for value in values(alias)) + ")"


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS taxonomies (
    name VARCHAR NOT NULL, version VARCHAR NOT NULL, label_version VARCHAR, description VARCHAR,
    multi_label BOOLEAN, yaml VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL, pushed_at TIMESTAMP NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS taxonomy_labels (
    taxonomy VARCHAR NOT NULL, version VARCHAR NOT NULL, label VARCHAR NOT NULL, parent VARCHAR,
    description VARCHAR, is_leaf BOOLEAN, position INTEGER,
    PRIMARY KEY (taxonomy, version, label));
CREATE TABLE IF NOT EXISTS prompt_tunings (
    taxonomy VARCHAR NOT NULL, taxonomy_version VARCHAR NOT NULL, model VARCHAR NOT NULL, prompt VARCHAR NOT NULL,
    calibration VARCHAR NOT NULL, prior DOUBLE[], criterion VARCHAR NOT NULL, evidence JSON NOT NULL,
    tuned_at TIMESTAMP NOT NULL,
    PRIMARY KEY (taxonomy, taxonomy_version, model));
CREATE TABLE IF NOT EXISTS jobs (
    job_id VARCHAR PRIMARY KEY, taxonomy VARCHAR NOT NULL, taxonomy_version VARCHAR NOT NULL,
    annotator VARCHAR NOT NULL, annotator_spec JSON, status VARCHAR NOT NULL CHECK (status IN {_in(JobState)}),
    total INTEGER NOT NULL,
    error VARCHAR, created_at TIMESTAMP NOT NULL, started_at TIMESTAMP, finished_at TIMESTAMP);
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS model VARCHAR;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS batch JSON;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS created_by VARCHAR;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS long_documents VARCHAR;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS shortlist JSON;
CREATE TABLE IF NOT EXISTS inductions (
    induction_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, status VARCHAR NOT NULL, stage VARCHAR,
    progress DOUBLE, options JSON, yaml VARCHAR, report JSON, error VARCHAR,
    created_at TIMESTAMP NOT NULL, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS job_shards (
    job_id VARCHAR NOT NULL, shard INTEGER NOT NULL, plan JSON NOT NULL, rows BIGINT NOT NULL,
    path VARCHAR, registered_at TIMESTAMP,
    PRIMARY KEY (job_id, shard));
CREATE TABLE IF NOT EXISTS documents (
    job_id VARCHAR NOT NULL, doc_id VARCHAR NOT NULL, position BIGINT NOT NULL, text VARCHAR NOT NULL,
    text_hash VARCHAR NOT NULL, meta JSON,
    PRIMARY KEY (job_id, doc_id));
CREATE TABLE IF NOT EXISTS annotations (
    job_id VARCHAR NOT NULL, doc_id VARCHAR NOT NULL, annotator VARCHAR NOT NULL, status VARCHAR NOT NULL,
    distribution MAP(VARCHAR, DOUBLE), label VARCHAR, labels VARCHAR[], confidence DOUBLE,
    candidates VARCHAR[], abstained BOOLEAN, abstain_reason VARCHAR, truncated BOOLEAN, error VARCHAR,
    model VARCHAR, engine VARCHAR, prompt_hash VARCHAR, taxonomy_version VARCHAR, decoding JSON,
    text_hash VARCHAR NOT NULL, cached BOOLEAN NOT NULL, latency_ms DOUBLE, created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (job_id, doc_id, annotator));
ALTER TABLE annotations ADD COLUMN IF NOT EXISTS chars_seen INTEGER;
ALTER TABLE annotations ADD COLUMN IF NOT EXISTS shortlist VARCHAR[];
CREATE INDEX IF NOT EXISTS annotations_by_text ON annotations (text_hash);
CREATE TABLE IF NOT EXISTS job_annotators (
    job_id VARCHAR NOT NULL, name VARCHAR NOT NULL, annotator VARCHAR NOT NULL, kind VARCHAR NOT NULL,
    model VARCHAR, prompt VARCHAR, weight DOUBLE, position INTEGER NOT NULL,
    PRIMARY KEY (job_id, name));
CREATE TABLE IF NOT EXISTS gold_samples (
    job_id VARCHAR NOT NULL, doc_id VARCHAR NOT NULL, design VARCHAR NOT NULL CHECK (design IN {_in(SamplingDesign)}),
    stratum VARCHAR,
    inclusion_prob DOUBLE NOT NULL, seed INTEGER, drawn_at TIMESTAMP NOT NULL,
    PRIMARY KEY (job_id, doc_id));
CREATE TABLE IF NOT EXISTS gold_labels (
    job_id VARCHAR NOT NULL, doc_id VARCHAR NOT NULL, annotator VARCHAR NOT NULL, label VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (job_id, doc_id, annotator));
CREATE TABLE IF NOT EXISTS calibrations (
    job_id VARCHAR PRIMARY KEY, alpha DOUBLE NOT NULL, threshold DOUBLE NOT NULL, coverage DOUBLE,
    avg_set_size DOUBLE, target_accuracy DOUBLE, abstain_threshold DOUBLE, result JSON NOT NULL,
    created_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS quality_metrics (
    job_id VARCHAR NOT NULL, metric VARCHAR NOT NULL, label VARCHAR, value DOUBLE, computed_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS confusion_matrix (
    job_id VARCHAR NOT NULL, gold_label VARCHAR NOT NULL, predicted_label VARCHAR NOT NULL, n INTEGER NOT NULL,
    weighted_n DOUBLE NOT NULL);
CREATE TABLE IF NOT EXISTS reliability (
    job_id VARCHAR NOT NULL, bin INTEGER NOT NULL, lower DOUBLE, upper DOUBLE, n INTEGER, confidence DOUBLE,
    accuracy DOUBLE);
CREATE TABLE IF NOT EXISTS selective_accuracy (
    job_id VARCHAR NOT NULL, coverage DOUBLE NOT NULL, threshold DOUBLE, accuracy DOUBLE, n INTEGER);
CREATE TABLE IF NOT EXISTS quality_results (
    job_id VARCHAR NOT NULL, kind VARCHAR NOT NULL, result JSON NOT NULL, computed_at TIMESTAMP NOT NULL,
    PRIMARY KEY (job_id, kind));
CREATE TABLE IF NOT EXISTS label_issues (
    job_id VARCHAR NOT NULL, kind VARCHAR NOT NULL CHECK (kind IN {_in(IssueKind)}), rank INTEGER NOT NULL,
    doc_id VARCHAR NOT NULL,
    given_label VARCHAR, suggested_label VARCHAR, quality DOUBLE, disagreement DOUBLE, suspicion DOUBLE,
    is_issue BOOLEAN, computed_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS classifiers (
    classifier_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, version INTEGER NOT NULL,
    kind VARCHAR NOT NULL CHECK (kind IN {_in(StudentKind)}),
    taxonomy VARCHAR NOT NULL, taxonomy_version VARCHAR NOT NULL, jobs JSON NOT NULL, options JSON,
    status VARCHAR NOT NULL, classes JSON, report JSON, path VARCHAR, size_bytes BIGINT, error VARCHAR,
    created_at TIMESTAMP NOT NULL, finished_at TIMESTAMP);
CREATE OR REPLACE VIEW labels AS
    SELECT a.job_id, a.doc_id, a.label, a.labels, a.confidence, a.candidates, a.abstained,
           a.abstain_reason, a.distribution, a.truncated, a.chars_seen, a.cached, a.shortlist,
           CASE WHEN c.threshold IS NOT NULL THEN list_transform(list_sort(list_transform(
               list_filter(map_entries(a.distribution), lambda e: e.value >= c.threshold),
               lambda e: {{'p': -e.value, 'k': e.key}})), lambda e: e.k) END AS conformal_candidates,
           d.text, d.meta, d.position
    FROM annotations a JOIN jobs j ON j.job_id = a.job_id AND j.annotator = a.annotator
    JOIN documents d ON d.job_id = a.job_id AND d.doc_id = a.doc_id
    LEFT JOIN calibrations c ON c.job_id = a.job_id
    WHERE a.status = 'ok';
CREATE OR REPLACE VIEW gold AS
    SELECT s.job_id, s.doc_id, s.design, s.stratum, s.inclusion_prob, 1 / s.inclusion_prob AS weight,
           h.gold_label, h.human_annotators, h.human_agreement, l.label AS llm_label, l.confidence, l.abstained,
           l.abstain_reason
    FROM gold_samples s
    LEFT JOIN (SELECT job_id, doc_id, first(label ORDER BY votes DESC, first_at, label) AS gold_label,
                      sum(votes)::INTEGER AS human_annotators, max(votes) / sum(votes) AS human_agreement
               FROM (SELECT job_id, doc_id, label, count(*) AS votes, min(created_at) AS first_at
                     FROM gold_labels GROUP BY ALL)
               GROUP BY job_id, doc_id) h USING (job_id, doc_id)
    LEFT JOIN labels l USING (job_id, doc_id);
"""

ANNOTATION_SCHEMA = pa.schema(
    [
        ("job_id", pa.string()), ("doc_id", pa.string()), ("annotator", pa.string()), ("status", pa.string()),
        ("distribution", pa.map_(pa.string(), pa.float64())), ("label", pa.string()),
        ("labels", pa.list_(pa.string())), ("confidence", pa.float64()), ("candidates", pa.list_(pa.string())),
        ("abstained", pa.bool_()), ("abstain_reason", pa.string()), ("truncated", pa.bool_()),
        ("error", pa.string()), ("model", pa.string()), ("engine", pa.string()), ("prompt_hash", pa.string()),
        ("taxonomy_version", pa.string()), ("decoding", pa.string()), ("text_hash", pa.string()),
        ("cached", pa.bool_()), ("latency_ms", pa.float64()), ("created_at", pa.timestamp("us")),
        ("chars_seen", pa.int32()), ("shortlist", pa.list_(pa.string())),  # inserts go BY NAME: a migrated
                                                                           # table's column order may differ
    ]
)
DOCUMENT_SCHEMA = pa.schema(
    [("job_id", pa.string()), ("doc_id", pa.string()), ("position", pa.int64()), ("text", pa.string()),
     ("text_hash", pa.string()), ("meta", pa.string())]
)


ANNOTATION_COLUMNS = ", ".join(ANNOTATION_SCHEMA.names)
DOCUMENT_COLUMNS = ", ".join(DOCUMENT_SCHEMA.names)
# DuckDB's share of the host's memory (its default is 80%): the ingress process also serves
# requests and may hold a model, so user SQL must not take most of it.
MEMORY_LIMIT = "25%"


def _quote(value: object) -> str:
    """A SQL string literal (SET takes no bound parameters)."""
    return "'" + str(value).replace("'", "''") + "'"


def scalar(cur: duckdb.DuckDBPyConnection, sql: str, params: list) -> Any:
    """The value of a query that always returns exactly one row (count(*), max(...), a SELECT without FROM)."""
    row = cur.execute(sql, params).fetchone()
    if row is None:
        raise AssertionError(f"a single-row query returned no row: {sql}")
    return row[0]


def utc_now() -> datetime:
    """Timestamps are stored as naive UTC (TIMESTAMP), which needs no time-zone library."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def as_utc(moment: datetime) -> datetime:
    """A stored timestamp as it is read back: time-zone aware UTC (so answers say it: ``…+00:00``)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def naive_utc(moment: datetime | None) -> datetime | None:
    """A moment as the TIMESTAMP columns hold it (naive UTC), for comparisons in SQL."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


class Database:
    """The DuckDB file: one connection, fresh cursors per call, one write lock."""

    def __init__(self, path: Path, *, export_dir: Path, read_only: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        export_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._db = duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            raise AnnotateError(
                f"cannot open {path}: {exc}. Another process (a running service?) holds it; "
                "talk to that service over HTTP instead"
            ) from exc
        self.write_lock = threading.Lock()  # writes one at a time; reads never wait
        if not read_only:
            self._db.execute(SCHEMA)
        self._lock_down(path.parent / "tmp", export_dir)

    def _lock_down(self, temp_dir: Path, export_dir: Path) -> None:
        """Close file and network access for the whole instance; order matters (DESIGN.md).

        The memory limit makes a huge sort, join or aggregation spill or fail with an error
        instead of starving the host; extensions are never installed or loaded on demand.
        """
        self._db.execute(f"SET temp_directory = {_quote(temp_dir)}")
        self._db.execute(f"SET memory_limit = {_quote(MEMORY_LIMIT)}")
        self._db.execute("SET autoinstall_known_extensions = false")
        self._db.execute("SET autoload_known_extensions = false")
        self._db.execute(f"SET allowed_directories = [{_quote(f'{export_dir}/')}]")
        self._db.execute("SET enable_external_access = false")
        self._db.execute("SET lock_configuration = true")

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor of the single instance, for one call on one thread."""
        return self._db.cursor()

    def close(self) -> None:
        """Release the file once any write in flight has committed and any read in flight has ended.

        A thread of a cancelled task may still be inside a call on the connection, which then
        refuses to close ("busy with another call"); it is given up to 10 s to finish.
        """
        with self.write_lock:
            for _ in range(100):
                try:
                    self._db.close()
                    return
                except duckdb.ResourceInUseException:
                    time.sleep(0.1)
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside BEGIN … COMMIT under the write lock, rolled back on any error."""
        with self.write_lock:
            cur = self.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def rows(self, sql: str, params: list | None = None) -> list[dict]:
        """Run a read and return rows as plain dicts."""
        cur = self.cursor().execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [{name: as_utc(value) if isinstance(value, datetime) else value for name, value in zip(names, row)}
                for row in cur.fetchall()]
