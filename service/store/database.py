"""The one owner of DuckDB: the connection, the schema and every SQL statement.

DuckDB allows one writer process, so exactly one ``Store`` (inside the service's ingress
replica, or the CLI when no service runs) holds the file. Every caller uses its methods;
each method takes a fresh cursor of the same instance, writes are serialised by one
lock, and bulk writes go through Arrow. User SQL goes through ``service.store.sandbox``, which
also runs on cursors of this instance, after ``_lock_down`` has closed file and network
access for the whole instance (DESIGN.md, "Known constraints").
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from service.errors import AnnotateError, InvalidInput, NotFound
from service.labelling.labeller import Annotation, TunedPrompt
from service.store.classifiers import ClassifierStore
from service.store.console import ConsoleStore
from service.store.quality import QualityStore, utc_now
from service.taxonomy import Taxonomy, parse_taxonomy

SCHEMA = """
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
    annotator VARCHAR NOT NULL, annotator_spec JSON, status VARCHAR NOT NULL, total INTEGER NOT NULL,
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
    job_id VARCHAR NOT NULL, doc_id VARCHAR NOT NULL, design VARCHAR NOT NULL, stratum VARCHAR,
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
CREATE TABLE IF NOT EXISTS label_issues (
    job_id VARCHAR NOT NULL, kind VARCHAR NOT NULL, rank INTEGER NOT NULL, doc_id VARCHAR NOT NULL,
    given_label VARCHAR, suggested_label VARCHAR, quality DOUBLE, disagreement DOUBLE, suspicion DOUBLE,
    is_issue BOOLEAN, computed_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS classifiers (
    classifier_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, version INTEGER NOT NULL, kind VARCHAR NOT NULL,
    taxonomy VARCHAR NOT NULL, taxonomy_version VARCHAR NOT NULL, jobs JSON NOT NULL, options JSON,
    status VARCHAR NOT NULL, classes JSON, report JSON, path VARCHAR, size_bytes BIGINT, error VARCHAR,
    created_at TIMESTAMP NOT NULL, finished_at TIMESTAMP);
CREATE OR REPLACE VIEW labels AS
    SELECT a.job_id, a.doc_id, a.label, a.labels, a.confidence, a.candidates, a.abstained,
           a.abstain_reason, a.distribution, a.truncated, a.chars_seen, a.cached, a.shortlist,
           CASE WHEN c.threshold IS NOT NULL THEN list_transform(list_sort(list_transform(
               list_filter(map_entries(a.distribution), lambda e: e.value >= c.threshold),
               lambda e: {'p': -e.value, 'k': e.key})), lambda e: e.k) END AS conformal_candidates,
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
_LABELLED = ("FROM gold g JOIN documents d USING (job_id, doc_id) JOIN jobs j USING (job_id)"
             " WHERE j.taxonomy = ? AND g.gold_label IS NOT NULL")  # the gold-labelled documents of a taxonomy
DOCUMENT_COLUMNS = ", ".join(DOCUMENT_SCHEMA.names)
# DuckDB's share of the host's memory (its default is 80%): the ingress process also serves
# requests and may hold a model, so user SQL must not take most of it.
MEMORY_LIMIT = "25%"


def _quote(value: object) -> str:
    """A SQL string literal (SET takes no bound parameters)."""
    return "'" + str(value).replace("'", "''") + "'"


class Store(QualityStore, ClassifierStore, ConsoleStore):
    """DuckDB file owner; all reads and writes of the service go through its methods."""

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
        self._write_lock = threading.Lock()
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
        with self._write_lock:
            for _ in range(100):
                try:
                    self._db.close()
                    return
                except duckdb.ResourceInUseException:
                    time.sleep(0.1)
            self._db.close()

    # taxonomies ---------------------------------------------------------------
    def put_taxonomy(self, taxonomy: Taxonomy, yaml_text: str) -> tuple[str, bool]:
        """Store a taxonomy version (content hash) and make it the current one; returns (version, created)."""
        version = taxonomy.content_hash()
        with self._transaction() as cur:
            if cur.execute(
                "UPDATE taxonomies SET pushed_at = ? WHERE name = ? AND version = ? RETURNING 1",
                [utc_now(), taxonomy.name, version],
            ).fetchall():
                return version, False
            cur.execute(
                "INSERT INTO taxonomies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [taxonomy.name, version, taxonomy.version, taxonomy.description, taxonomy.multi_label, yaml_text,
                 utc_now(), utc_now()],
            )
            leaves = set(taxonomy.label_names())
            cur.executemany(
                "INSERT INTO taxonomy_labels VALUES (?, ?, ?, ?, ?, ?, ?)",
                [[taxonomy.name, version, label.name, label.parent, label.description, label.name in leaves, i]
                 for i, label in enumerate(taxonomy.labels)],
            )
        return version, True

    def get_taxonomy(self, name: str, version: str | None = None) -> tuple[Taxonomy, str, str]:
        """(taxonomy, version, yaml) of a named taxonomy: the last pushed version unless one is given."""
        sql = "SELECT version, yaml FROM taxonomies WHERE name = ?"
        params: list = [name]
        if version:
            sql += " AND version = ?"
            params.append(version)
        row = self.cursor().execute(sql + " ORDER BY pushed_at DESC LIMIT 1", params).fetchone()
        if row is None:
            known = [r[0] for r in self.cursor().execute("SELECT DISTINCT name FROM taxonomies ORDER BY 1").fetchall()]
            what = f"taxonomy {name!r}" + (f" version {version!r}" if version else "")
            raise NotFound(f"unknown {what}; known taxonomies: {', '.join(known) or 'none (push one first)'}")
        return parse_taxonomy(row[1], source=f"store:{name}@{row[0]}"), row[0], row[1]

    def put_prompt_tuning(self, taxonomy: str, version: str, model: str, choice: TunedPrompt, criterion: str,
                          evidence: dict) -> None:
        """Keep the prompt a tuning chose for a taxonomy version on a model (replacing an earlier one)."""
        with self._transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO prompt_tunings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [taxonomy, version, model, choice.prompt, choice.calibration,
                         None if choice.prior is None else list(choice.prior), criterion, json.dumps(evidence),
                         utc_now()])

    def prompt_tunings(self, taxonomy: str, version: str) -> list[dict]:
        """The tunings of a taxonomy version, one per model, with their evidence."""
        rows = self._dicts("SELECT model, prompt, calibration, prior, criterion, evidence, tuned_at FROM prompt_tunings"
                           " WHERE taxonomy = ? AND taxonomy_version = ? ORDER BY model", [taxonomy, version])
        return [{**row, "evidence": json.loads(row["evidence"])} for row in rows]

    def tuned_prompt(self, taxonomy: str, version: str, model: str) -> TunedPrompt | None:
        """The prompt (and calibration) a tuning chose for this taxonomy version and model, if one ran."""
        row = self.cursor().execute("SELECT prompt, calibration, prior FROM prompt_tunings WHERE taxonomy = ? AND"
                                    " taxonomy_version = ? AND model = ?", [taxonomy, version, model]).fetchone()
        return None if row is None else TunedPrompt(row[0], row[1], None if row[2] is None else tuple(row[2]))

    def list_taxonomies(self) -> list[dict]:
        """Every taxonomy version, newest first."""
        return self._dicts(
            "SELECT name, version, label_version, description, multi_label, created_at,"
            " (SELECT count(*) FROM taxonomy_labels l WHERE l.taxonomy = t.name AND l.version = t.version) AS labels"
            " FROM taxonomies t ORDER BY name, created_at DESC"
        )

    def taxonomy_versions(self, name: str) -> list[dict]:
        """The versions of one taxonomy, the current (last pushed) first."""
        rows = self._dicts(
            "SELECT version, label_version, created_at, pushed_at FROM taxonomies WHERE name = ? ORDER BY pushed_at DESC",
            [name],
        )
        if not rows:
            self.get_taxonomy(name)  # raises NotFound with the known names
        return rows

    # jobs ---------------------------------------------------------------------
    def create_job(self, *, job_id: str, taxonomy: str, version: str, model: str, annotator: str,
                   annotator_spec: dict, annotators: list[dict], batches: Iterable[pa.RecordBatch] = (),
                   batch: dict | None = None,
                   shards: list[dict] | None = None, created_by: str | None = None,
                   long_documents: str | None = None, shortlist: dict | None = None) -> int:
        """Insert a job with its documents (or, for a batch job, its shard plan) in one transaction; returns the total.

        No write lock: the batches may come from a large file, and DuckDB appends of a new
        job never conflict with other jobs' annotation commits, which go on meanwhile.
        """
        cur = self.cursor()
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
                total = cur.execute("SELECT count(*) FROM documents WHERE job_id = ?", [job_id]).fetchone()[0]
            cur.execute("UPDATE jobs SET total = ? WHERE job_id = ?", [total, job_id])
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return total

    def rekey_job(self, job_id: str, *, annotator: str, annotator_spec: dict, annotators: list[dict]) -> bool:
        """Give a job new annotators (a tuning chose its prompt), in one transaction; False, and nothing changed,
        once it has annotations: they were made under the old ones."""
        with self._transaction() as cur:
            if cur.execute("SELECT count(*) FROM annotations WHERE job_id = ?", [job_id]).fetchone()[0]:
                return False
            cur.execute("UPDATE jobs SET annotator = ?, annotator_spec = ? WHERE job_id = ?",
                        [annotator, json.dumps(annotator_spec), job_id])
            cur.execute("DELETE FROM job_annotators WHERE job_id = ?", [job_id])
            _insert_annotators(cur, job_id, annotators)
        return True

    def sample_texts(self, job_id: str, size: int) -> list[str]:
        """Up to ``size`` of a job's texts, the same ones every time (ordered by a hash of their ids)."""
        rows = self.cursor().execute("SELECT text FROM documents WHERE job_id = ? ORDER BY hash(doc_id) LIMIT ?",
                                     [job_id, size]).fetchall()
        return [text for (text,) in rows]

    def job(self, job_id: str) -> dict:
        """A job's row with live counts of done, failed and abstained documents."""
        rows = self._dicts(
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
        row["annotator_spec"] = json.loads(row["annotator_spec"])
        row["batch"] = None if row["batch"] is None else json.loads(row["batch"])
        row["shortlist"] = None if row["shortlist"] is None else json.loads(row["shortlist"])
        row["annotators"] = self.job_annotators(job_id)
        return row

    def list_jobs(self, limit: int = 100) -> list[dict]:
        """The most recent jobs, newest first."""
        return self._dicts(
            "SELECT job_id, taxonomy, taxonomy_version, status, total, created_at, finished_at FROM jobs"
            " ORDER BY created_at DESC LIMIT ?",
            [limit],
        )

    def active_jobs_of(self, token_id: str) -> int:
        """Queued or running jobs one API token submitted."""
        return self.cursor().execute("SELECT count(*) FROM jobs WHERE created_by = ? AND status IN ('queued', 'running')",
                                     [token_id]).fetchone()[0]

    def active_jobs(self) -> list[str]:
        """Jobs to (re)start: queued or interrupted while running, oldest first."""
        rows = self.cursor().execute(
            "SELECT job_id FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at"
        ).fetchall()
        return [r[0] for r in rows]

    def set_job_status(self, job_id: str, status: str, *, error: str | None = None,
                       only_if_active: bool = False) -> bool:
        """Move a job to a status; returns False when only_if_active and it had already ended."""
        stamp = {"running": "started_at = coalesce(started_at, ?)"}.get(status, "finished_at = ?")
        sql = f"UPDATE jobs SET status = ?, error = coalesce(?, error), {stamp} WHERE job_id = ?"
        if only_if_active:
            sql += " AND status IN ('queued', 'running')"
        with self._write_lock:
            changed = self.cursor().execute(sql + " RETURNING job_id", [status, error, utc_now(), job_id]).fetchall()
        return bool(changed)

    def job_state(self, job_id: str) -> str:
        """Just a job's status: cheap enough to check between batches."""
        row = self.cursor().execute("SELECT status FROM jobs WHERE job_id = ?", [job_id]).fetchone()
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
        return self.cursor().execute(
            "SELECT d.position, d.doc_id, d.text, d.text_hash FROM documents d"
            " ANTI JOIN annotations a ON a.job_id = d.job_id AND a.doc_id = d.doc_id AND a.annotator = ?"
            f" WHERE d.job_id = ? AND d.position >= ?{routed} ORDER BY d.position LIMIT ?",
            params + [limit],
        ).fetchall()

    def pending_shards(self, job_id: str) -> list[dict]:
        """Shard plans of a batch job that are not registered yet, in order."""
        rows = self.cursor().execute(
            "SELECT plan FROM job_shards WHERE job_id = ? AND registered_at IS NULL ORDER BY shard", [job_id]
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def register_shard(self, job_id: str, shard: int, path: Path) -> None:
        """Load a finished shard file's documents and annotations, and mark the shard done, in one transaction."""
        with self._transaction() as cur:
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

    # inductions ---------------------------------------------------------------
    def create_induction(self, induction_id: str, name: str, options: dict) -> None:
        """Record a queued taxonomy induction."""
        with self._write_lock:
            self.cursor().execute(
                "INSERT INTO inductions (induction_id, name, status, stage, progress, options, created_at)"
                " VALUES (?, ?, 'queued', 'queued', 0, ?, ?)", [induction_id, name, json.dumps(options), utc_now()])

    def update_induction(self, induction_id: str, *, status: str, stage: str, progress: float,
                         yaml_text: str | None = None, report: dict | None = None, error: str | None = None) -> None:
        """Move an induction along; a final status stamps finished_at."""
        finished = utc_now() if status in ("succeeded", "failed") else None
        with self._write_lock:
            self.cursor().execute(
                "UPDATE inductions SET status = ?, stage = ?, progress = ?, yaml = coalesce(?, yaml),"
                " report = coalesce(?, report), error = coalesce(?, error), finished_at = ? WHERE induction_id = ?",
                [status, stage, progress, yaml_text, None if report is None else json.dumps(report), error, finished,
                 induction_id])

    def induction(self, induction_id: str) -> dict:
        """An induction's state, and its YAML and report once done."""
        rows = self._dicts("SELECT * FROM inductions WHERE induction_id = ?", [induction_id])
        if not rows:
            raise NotFound(f"unknown induction {induction_id!r}")
        row = rows[0]
        for key in ("options", "report"):
            row[key] = None if row[key] is None else json.loads(row[key])
        return row

    def interrupt_inductions(self) -> int:
        """Inductions cut off by a stop (their inputs were not kept) fail with a message; returns how many."""
        with self._write_lock:
            return len(self.cursor().execute(
                "UPDATE inductions SET status = 'failed', error = 'interrupted by a service restart; submit it again',"
                " finished_at = ? WHERE status IN ('queued', 'running') RETURNING 1", [utc_now()]).fetchall())

    def cached_annotations(self, annotator: str, text_hashes: list[str]) -> dict[str, Annotation]:
        """Earlier successful annotations of the same text by the same annotator, by text hash."""
        if not text_hashes:
            return {}
        cur = self.cursor()
        cur.execute(
            "SELECT DISTINCT ON (text_hash) text_hash, distribution, label, labels, confidence, candidates,"
            " abstained, abstain_reason, truncated, chars_seen, shortlist FROM annotations"
            " WHERE annotator = ? AND status = 'ok' AND text_hash IN (SELECT unnest(?::VARCHAR[]))",
            [annotator, text_hashes],
        )
        found = {}
        for text_hash, dist, label, labels, confidence, candidates, abstained, reason, truncated, seen, shortlist \
                in cur.fetchall():
            found[text_hash] = Annotation(
                distribution=dict(dist), label=label, labels=list(labels), confidence=confidence,
                candidates=list(candidates), abstained=abstained, abstain_reason=reason, truncated=truncated,
                chars_seen=seen, shortlist=shortlist,
            )
        return found

    def labelled_texts(self, taxonomy: str, limit: int = 5000, before: datetime | None = None) -> list[tuple[str, str]]:
        """(text, gold label) of the documents people labelled in the taxonomy's jobs, the most recent last.

        With ``before``, only what was known then: jobs created and labels given before it, so a
        resumed job sees the pool it started with. The label is the majority of those labels, by
        the ``gold`` view's rule (which cannot take a time).
        """
        rows = self.cursor().execute(
            "WITH votes AS (SELECT job_id, doc_id, label, count(*) AS n, min(created_at) AS first_at FROM gold_labels"
            " WHERE created_at < coalesce(?::TIMESTAMP, 'infinity'::TIMESTAMP) GROUP BY ALL),"
            " known AS (SELECT job_id, doc_id, first(label ORDER BY n DESC, first_at, label) AS gold_label FROM votes"
            " GROUP BY ALL)"
            " SELECT d.text, k.gold_label FROM known k JOIN gold_samples s USING (job_id, doc_id)"
            " JOIN documents d USING (job_id, doc_id) JOIN jobs j USING (job_id)"
            " WHERE j.taxonomy = ? AND j.created_at < coalesce(?::TIMESTAMP, 'infinity'::TIMESTAMP)"
            " ORDER BY j.created_at DESC, d.position LIMIT ?", [before, taxonomy, before, limit]).fetchall()
        return [(text, label) for text, label in reversed(rows)]

    def labelled_count(self, taxonomy: str) -> int:
        """How many documents people labelled in the taxonomy's jobs (tells when a retriever is out of date)."""
        return self.cursor().execute(f"SELECT count(*) {_LABELLED}", [taxonomy]).fetchone()[0]

    def write_annotations(self, rows: list[dict]) -> None:
        """Append a batch of annotation rows atomically; rows already present are kept as they were."""
        if not rows:
            return
        table = self._annotation_table(rows)
        with self._write_lock:
            cur = self.cursor()
            cur.register("annotation_batch", table)
            try:
                cur.execute("INSERT OR IGNORE INTO annotations BY NAME SELECT * FROM annotation_batch")
            finally:
                cur.unregister("annotation_batch")

    @staticmethod
    def _annotation_table(rows: list[dict]) -> pa.Table:
        """Annotation rows (``annotation_row``) as an Arrow table for a bulk insert."""
        return pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA)

    def label_reader(self, job_id: str, batch_size: int = 10_000) -> pa.RecordBatchReader:
        """A job's labels as a stream of Arrow batches in input order (bounded memory for exports)."""
        self.job(job_id)
        return self.cursor().sql(
            "SELECT doc_id, label, labels, confidence, candidates, conformal_candidates, abstained, abstain_reason,"
            " distribution, truncated, chars_seen, cached FROM labels WHERE job_id = ? ORDER BY position",
            params=[job_id],
        ).to_arrow_reader(batch_size)

    def failures(self, job_id: str) -> list[dict]:
        """Documents that failed, with their errors."""
        return self._dicts(
            "SELECT doc_id, error FROM annotations WHERE job_id = ? AND status = 'failed' ORDER BY doc_id", [job_id]
        )

    def _dicts(self, sql: str, params: list | None = None) -> list[dict]:
        """Run a read and return rows as plain dicts."""
        cur = self.cursor().execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


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


def annotation_row(annotation: Annotation, **keys) -> dict:
    """Flatten an Annotation plus its identifying keys into a row of ANNOTATION_SCHEMA."""
    row = asdict(annotation)
    row["distribution"] = list(row["distribution"].items())
    row.update(keys)
    row.setdefault("created_at", utc_now())
    return row
