"""Jobs, their documents and, for batch jobs, their shards: what was asked and how far it got."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from service.errors import InvalidInput, NotFound
from service.store.database import ANNOTATION_COLUMNS, DOCUMENT_COLUMNS, DOCUMENT_SCHEMA, Database, scalar, utc_now
from service.vocabulary import LongDocuments


@dataclass(frozen=True)
class JobAnnotator:
    """One annotator of a job, in panel order, with its progress counts."""

    name: str
    annotator: str  # its key: what determines its annotations
    kind: str
    model: str | None
    prompt: str | None
    weight: float | None
    done: int
    failed: int
    abstained: int

    def entry(self) -> dict:
        """The annotator as a job's request named it (kind, model, prompt, weight), to build it again."""
        return {"name": self.name, "annotator": self.annotator, "kind": self.kind, "model": self.model,
                "prompt": self.prompt, "weight": self.weight}


@dataclass(frozen=True)
class Job:
    """A job as stored, with live counts of its documents (those of its output annotator)."""

    job_id: str
    taxonomy: str
    taxonomy_version: str
    model: str
    batch: dict | None  # a batch job's source and fields; None for a stream job
    long_documents: LongDocuments | None  # written from validated requests only (JobRequest)
    shortlist: dict | None
    annotator: str  # the output annotator: the only one's key, or the aggregate's
    annotator_spec: dict
    status: str
    total: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    shards: int
    shards_done: int
    done: int
    failed: int
    abstained: int
    cached: int
    annotators: list[JobAnnotator]


@dataclass(frozen=True)
class JobSummary:
    """A job in the list of recent jobs."""

    job_id: str
    taxonomy: str
    taxonomy_version: str
    status: str
    total: int
    created_at: datetime
    finished_at: datetime | None


class Jobs:
    """Jobs: one repository of the store (``service.store.Store``)."""

    def __init__(self, db: Database):
        self._db = db

    def create(self, *, job_id: str, taxonomy: str, version: str, model: str, annotator: str,
                   annotator_spec: dict, annotators: list[dict], batches: Iterable[pa.RecordBatch] = (),
                   batch: dict | None = None,
                   shards: list[dict] | None = None, created_by: str | None = None,
                   long_documents: LongDocuments | None = None, shortlist: dict | None = None) -> int:
        """Insert a job with its documents (or, for a batch job, its shard plan) in one transaction; returns the total.

        No write lock: the batches may come from a large file, and DuckDB appends of a new
        job never conflict with other jobs' annotation commits, which go on meanwhile.
        """
        cur = self._db.cursor()
        cur.execute("BEGIN")
        try:
            cur.execute(
                "INSERT INTO jobs (job_id, taxonomy, taxonomy_version, annotator, annotator_spec, status, total,"
                " created_at, model, batch, created_by, long_documents, shortlist)"
                " VALUES (?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?)",
                [job_id, taxonomy, version, annotator, json.dumps(annotator_spec), utc_now(), model,
                 None if batch is None else json.dumps(batch), created_by, long_documents,
                 None if shortlist is None else json.dumps(shortlist)],
            )
            _insert_annotators(cur, job_id, annotators)
            if shards:
                cur.executemany("INSERT INTO job_shards (job_id, shard, plan, rows) VALUES (?, ?, ?, ?)",
                                [[job_id, p["shard"], json.dumps(p), p["rows"]] for p in shards])
                total = sum(p["rows"] for p in shards)
            else:
                for batch_rows in batches:
                    cur.register("document_batch", batch_rows)
                    cur.execute("INSERT INTO documents SELECT * FROM document_batch")
                    cur.unregister("document_batch")
                total = scalar(cur, "SELECT count(*) FROM documents WHERE job_id = ?", [job_id])
            cur.execute("UPDATE jobs SET total = ? WHERE job_id = ?", [total, job_id])
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return total

    def rekey(self, job_id: str, *, annotator: str, annotator_spec: dict, annotators: list[dict]) -> bool:
        """Give a job new annotators (a tuning chose its prompt), in one transaction; False, and nothing changed,
        once it has annotations: they were made under the old ones."""
        with self._db.transaction() as cur:
            if scalar(cur, "SELECT count(*) FROM annotations WHERE job_id = ?", [job_id]):
                return False
            cur.execute("UPDATE jobs SET annotator = ?, annotator_spec = ? WHERE job_id = ?",
                        [annotator, json.dumps(annotator_spec), job_id])
            cur.execute("DELETE FROM job_annotators WHERE job_id = ?", [job_id])
            _insert_annotators(cur, job_id, annotators)
        return True

    def sample_texts(self, job_id: str, size: int) -> list[str]:
        """Up to ``size`` of a job's texts, the same ones every time (ordered by a hash of their ids)."""
        rows = self._db.cursor().execute("SELECT text FROM documents WHERE job_id = ? ORDER BY hash(doc_id) LIMIT ?",
                                     [job_id, size]).fetchall()
        return [text for (text,) in rows]

    def get(self, job_id: str) -> Job:
        """A job's row with live counts of done, failed and abstained documents."""
        rows = self._db.rows(
            "SELECT j.job_id, j.taxonomy, j.taxonomy_version, j.model, j.batch, j.long_documents, j.shortlist,"
            " j.annotator,"
            " j.annotator_spec, j.status,"
            " j.total, j.error, j.created_at, j.started_at, j.finished_at,"
            " (SELECT count(*) FROM job_shards s WHERE s.job_id = j.job_id) AS shards,"
            " (SELECT count(*) FROM job_shards s WHERE s.job_id = j.job_id AND s.registered_at IS NOT NULL)"
            " AS shards_done,"
            " count(a.doc_id) FILTER (WHERE a.status = 'ok') AS done,"
            " count(a.doc_id) FILTER (WHERE a.status = 'failed') AS failed,"
            " count(a.doc_id) FILTER (WHERE a.abstained) AS abstained,"
            " count(a.doc_id) FILTER (WHERE a.cached) AS cached"
            " FROM jobs j LEFT JOIN annotations a ON a.job_id = j.job_id AND a.annotator = j.annotator"
            " WHERE j.job_id = ? GROUP BY ALL",
            [job_id],
        )
        if not rows:
            raise NotFound(f"unknown job {job_id!r}")
        row = rows[0]
        for key in ("annotator_spec", "batch", "shortlist"):
            row[key] = None if row[key] is None else json.loads(row[key])
        return Job(**row, annotators=self.annotators(job_id))

    def recent(self, limit: int = 100) -> list[JobSummary]:
        """The most recent jobs, newest first."""
        return [JobSummary(**row) for row in self._db.rows(
            "SELECT job_id, taxonomy, taxonomy_version, status, total, created_at, finished_at FROM jobs"
            " ORDER BY created_at DESC LIMIT ?", [limit])]

    def active_of(self, token_id: str) -> int:
        """Queued or running jobs one API token submitted."""
        return scalar(self._db.cursor(), "SELECT count(*) FROM jobs WHERE created_by = ? AND status IN ('queued', 'running')",
                      [token_id])

    def active(self) -> list[str]:
        """Jobs to (re)start: queued or interrupted while running, oldest first."""
        rows = self._db.cursor().execute(
            "SELECT job_id FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at"
        ).fetchall()
        return [r[0] for r in rows]

    def set_status(self, job_id: str, status: str, *, error: str | None = None,
                       only_if_active: bool = False) -> bool:
        """Move a job to a status; returns False when only_if_active and it had already ended."""
        stamp = {"running": "started_at = coalesce(started_at, ?)"}.get(status, "finished_at = ?")
        sql = f"UPDATE jobs SET status = ?, error = coalesce(?, error), {stamp} WHERE job_id = ?"
        if only_if_active:
            sql += " AND status IN ('queued', 'running')"
        with self._db.write_lock:
            changed = self._db.cursor().execute(sql + " RETURNING job_id", [status, error, utc_now(), job_id]).fetchall()
        return bool(changed)

    def state(self, job_id: str) -> str:
        """Just a job's status: cheap enough to check between batches."""
        row = self._db.cursor().execute("SELECT status FROM jobs WHERE job_id = ?", [job_id]).fetchone()
        if row is None:
            raise NotFound(f"unknown job {job_id!r}")
        return row[0]

    def pending_documents(self, job_id: str, annotator: str, limit: int, from_position: int = 0,
                          route: tuple[str, float] | None = None) -> list[tuple[int, str, str, str]]:
        """(position, doc_id, text, text_hash) of unannotated documents at or after a position, in input order.

        With ``route`` (annotator, threshold): only documents that annotator was unsure of.
        """
        routed = ""
        params = [annotator, job_id, from_position]
        if route is not None:
            routed = (" AND d.doc_id IN (SELECT doc_id FROM annotations WHERE job_id = ? AND annotator = ?"
                      " AND (status = 'failed' OR abstained OR confidence < ?))")
            params += [job_id, *route]
        return self._db.cursor().execute(
            "SELECT d.position, d.doc_id, d.text, d.text_hash FROM documents d"
            " ANTI JOIN annotations a ON a.job_id = d.job_id AND a.doc_id = d.doc_id AND a.annotator = ?"
            f" WHERE d.job_id = ? AND d.position >= ?{routed} ORDER BY d.position LIMIT ?",
            params + [limit],
        ).fetchall()

    def pending_shards(self, job_id: str) -> list[dict]:
        """Shard plans of a batch job that are not registered yet, in order."""
        rows = self._db.cursor().execute(
            "SELECT plan FROM job_shards WHERE job_id = ? AND registered_at IS NULL ORDER BY shard", [job_id]
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def register_shard(self, job_id: str, shard: int, path: Path) -> None:
        """Load a finished shard file's documents and annotations, and mark the shard done, in one transaction."""
        with self._db.transaction() as cur:
            duplicate = cur.execute(
                "SELECT p.doc_id FROM read_parquet(?) p LEFT JOIN documents d ON d.job_id = p.job_id"
                " AND d.doc_id = p.doc_id GROUP BY p.doc_id HAVING count(*) > 1 OR any_value(d.doc_id) IS NOT NULL"
                " LIMIT 1", [str(path)]).fetchone()
            if duplicate:
                raise InvalidInput(f"document id {duplicate[0]!r} occurs more than once in the source "
                                   f"(found in shard {shard}); ids must be unique")
            cur.execute(f"INSERT INTO documents SELECT {DOCUMENT_COLUMNS} FROM read_parquet(?)", [str(path)])
            cur.execute(f"INSERT INTO annotations BY NAME SELECT {ANNOTATION_COLUMNS} FROM read_parquet(?)", [str(path)])
            cur.execute("UPDATE job_shards SET path = ?, registered_at = ? WHERE job_id = ? AND shard = ?",
                        [str(path), utc_now(), job_id, shard])

    def annotators(self, job_id: str) -> list[JobAnnotator]:
        """A job's annotators in order, each with its progress counts."""
        return [JobAnnotator(**row) for row in self._db.rows(
            "SELECT ja.name, ja.annotator, ja.kind, ja.model, ja.prompt, ja.weight,"
            " count(a.doc_id) FILTER (WHERE a.status = 'ok') AS done,"
            " count(a.doc_id) FILTER (WHERE a.status = 'failed') AS failed,"
            " count(a.doc_id) FILTER (WHERE a.abstained) AS abstained"
            " FROM job_annotators ja LEFT JOIN annotations a ON a.job_id = ja.job_id AND a.annotator = ja.annotator"
            " WHERE ja.job_id = ? GROUP BY ALL ORDER BY any_value(ja.position)", [job_id])]


def _insert_annotators(cur: duckdb.DuckDBPyConnection, job_id: str, annotators: list[dict]) -> None:
    """A job's annotator rows, in panel order."""
    if annotators:
        cur.executemany("INSERT INTO job_annotators VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [[job_id, a["name"], a["annotator"], a["kind"], a.get("model"), a.get("prompt"),
                          a.get("weight"), i] for i, a in enumerate(annotators)])


def document_batch(job_id: str, rows: list[dict], start: int) -> pa.RecordBatch:
    """Arrow batch of validated documents (dicts with doc_id, text, text_hash, meta) for create_job."""
    return pa.RecordBatch.from_pylist(
        [{"job_id": job_id, "doc_id": r["doc_id"], "position": start + i, "text": r["text"],
          "text_hash": r["text_hash"], "meta": json.dumps(r.get("meta") or {})} for i, r in enumerate(rows)],
        schema=DOCUMENT_SCHEMA,
    )
