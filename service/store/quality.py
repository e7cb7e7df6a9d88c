"""The store's SQL for several annotators, gold samples and quality results (a part of ``Store``).

Kept apart from ``service.store.database`` only for size: the same single DuckDB owner, the same
write lock, the tables declared in ``store.SCHEMA``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import duckdb
import numpy as np

from service.errors import Conflict, InvalidInput, NotFound


def utc_now() -> datetime:
    """Timestamps are stored as naive UTC (TIMESTAMP), which needs no time-zone library."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class QualityStore:
    """Reads and writes of annotators, aggregates, gold samples, reports, calibrations and label issues."""

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside BEGIN … COMMIT under the write lock, rolled back on any error."""
        with self._write_lock:
            cur = self.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def job_annotators(self, job_id: str) -> list[dict]:
        """A job's annotators in order, each with its progress counts."""
        return self._dicts(
            "SELECT ja.name, ja.annotator, ja.kind, ja.model, ja.prompt, ja.weight,"
            " count(a.doc_id) FILTER (WHERE a.status = 'ok') AS done,"
            " count(a.doc_id) FILTER (WHERE a.status = 'failed') AS failed,"
            " count(a.doc_id) FILTER (WHERE a.abstained) AS abstained"
            " FROM job_annotators ja LEFT JOIN annotations a ON a.job_id = ja.job_id AND a.annotator = ja.annotator"
            " WHERE ja.job_id = ? GROUP BY ALL ORDER BY any_value(ja.position)", [job_id])

    def member_rows(self, job_id: str) -> list[dict]:
        """Every annotator's row for every document of a job (its own output excluded), with the text hash."""
        rows = self._dicts(
            "SELECT a.doc_id, a.annotator, a.status, a.label, a.distribution, a.abstained, a.abstain_reason, a.error,"
            " a.truncated, a.chars_seen, d.text_hash FROM annotations a JOIN job_annotators ja USING (job_id, annotator)"
            " JOIN documents d USING (job_id, doc_id) WHERE a.job_id = ? ORDER BY d.position, ja.position", [job_id])
        for row in rows:
            row["distribution"] = dict(row["distribution"] or {})
        return rows

    def replace_aggregate(self, job_id: str, annotator: str, rows: list[dict], *, method: str,
                          refinement: dict | None = None) -> None:
        """Swap a job's aggregated rows for new ones, and record the method (and what refined them), in one transaction."""
        table = self._annotation_table(rows)
        with self._transaction() as cur:
            cur.execute("DELETE FROM annotations WHERE job_id = ? AND annotator = ?", [job_id, annotator])
            cur.register("annotation_batch", table)
            cur.execute("INSERT INTO annotations BY NAME SELECT * FROM annotation_batch")
            cur.unregister("annotation_batch")
            cur.execute("UPDATE jobs SET annotator_spec = json_merge_patch(annotator_spec, ?) WHERE job_id = ?",
                        [json.dumps({"aggregation": method, "refinement": refinement}), job_id])

    def merge_cascade(self, job_id: str, output: str, student: str, llm: str, threshold: float) -> None:
        """A cascade's labels: the LLM's where it was asked, the student's elsewhere, in one transaction."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM annotations WHERE job_id = ? AND annotator = ?", [job_id, output])
            cur.execute(
                "INSERT INTO annotations SELECT job_id, doc_id, ? AS annotator, status, distribution, label, labels,"
                " confidence, candidates, abstained, abstain_reason, truncated, error, model, engine, prompt_hash,"
                " taxonomy_version, ? AS decoding, text_hash, cached, latency_ms, created_at, chars_seen, shortlist"
                " FROM annotations"
                " WHERE job_id = ? AND annotator IN (?, ?)"
                " QUALIFY row_number() OVER (PARTITION BY doc_id ORDER BY annotator = ? DESC) = 1",
                [output, json.dumps({"method": "cascade", "threshold": threshold, "student": student, "llm": llm}),
                 job_id, student, llm, llm])

    def population(self, job_id: str, options: list[str], *, with_text: bool = False) -> dict:
        """Every labelled document of a job as arrays: its distribution over ``options``, label, gold and π.

        The texts are read only ``with_text`` (training students, auditing labels); statistics need none.
        """
        text = " l.text," if with_text else ""
        table = self.cursor().sql(
            "SELECT l.doc_id, list_transform(?::VARCHAR[], lambda k: coalesce(l.distribution[k], 0.0)) AS probs,"
            f" l.label, l.candidates, l.abstained, l.abstain_reason, l.shortlist, l.meta, length(l.text) AS text_chars,"
            f"{text}"
            " g.inclusion_prob, g.gold_label, g.human_agreement FROM labels l LEFT JOIN gold g USING (job_id, doc_id)"
            " WHERE l.job_id = ? ORDER BY l.position", params=[options, job_id]).to_arrow_table()
        columns = table.to_pydict()
        k = len(options)
        columns["probs"] = np.array(columns["probs"], dtype=float).reshape(-1, k)
        columns["inclusion_prob"] = np.array([np.nan if p is None else p for p in columns["inclusion_prob"]])
        return columns

    # gold ---------------------------------------------------------------------
    def put_gold_sample(self, job_id: str, *, design: str, seed: int, rows: list[tuple[str, str | None, float]],
                        replace: bool) -> None:
        """Store a drawn sample (doc_id, stratum, inclusion probability); an existing one only with ``replace``."""
        with self._transaction() as cur:
            existing = cur.execute("SELECT count(*) FROM gold_samples WHERE job_id = ?", [job_id]).fetchone()[0]
            if existing and not replace:
                raise Conflict(f"job {job_id} already has a gold sample of {existing} documents; pass "
                               "'replace': true to draw a new one (gold labels given so far are kept)")
            cur.execute("DELETE FROM gold_samples WHERE job_id = ?", [job_id])
            cur.executemany("INSERT INTO gold_samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [[job_id, doc_id, design, stratum, pi, seed, utc_now()] for doc_id, stratum, pi in rows])

    def gold_sample(self, job_id: str) -> list[dict]:
        """The sampled documents with their text, inclusion probability and human labels so far."""
        rows = self._dicts(
            "SELECT g.doc_id, d.text, g.stratum, g.inclusion_prob, g.gold_label, g.human_annotators, g.llm_label,"
            " g.confidence FROM gold g JOIN documents d USING (job_id, doc_id) WHERE g.job_id = ? ORDER BY d.position",
            [job_id])
        if not rows:
            raise NotFound(f"job {job_id} has no gold sample; draw one with POST /v1/jobs/{job_id}/gold-sample "
                           "(or `annotate gold sample`)")
        return rows

    def put_gold_labels(self, job_id: str, rows: list[tuple[str, str, str]], *, max_annotators: int) -> int:
        """Store human labels (doc_id, annotator, label) of sampled documents; a repeat by the same person replaces.

        At most ``max_annotators`` distinct people per job: agreement statistics compare every pair of them.
        """
        with self._transaction() as cur:
            people = {r[0] for r in cur.execute("SELECT DISTINCT annotator FROM gold_labels WHERE job_id = ?",
                                                [job_id]).fetchall()} | {annotator for _, annotator, _ in rows}
            if len(people) > max_annotators:
                raise InvalidInput(f"job {job_id}'s gold labels would come from {len(people):,} people, over the limit "
                                   f"of {max_annotators:,} (ANNOTATE_GOLD_MAX_ANNOTATORS)")
            sampled = {r[0] for r in cur.execute("SELECT doc_id FROM gold_samples WHERE job_id = ?", [job_id]).fetchall()}
            outside = [doc_id for doc_id, _, _ in rows if doc_id not in sampled]
            if outside:
                raise InvalidInput(f"{len(outside)} labelled document(s) are not in job {job_id}'s gold sample, e.g. "
                                   f"{outside[:3]}; statistics need each gold document's inclusion probability, so "
                                   "label the documents of the sample (GET .../gold-sample)")
            cur.executemany("INSERT OR REPLACE INTO gold_labels VALUES (?, ?, ?, ?, ?)",
                            [[job_id, doc_id, annotator, label, utc_now()] for doc_id, annotator, label in rows])
        return len(rows)

    def documents_with_gold(self, job_id: str, max_chars: int) -> list[dict]:
        """Every document of a job in order: doc_id, its first ``max_chars`` characters, and its gold label (or None)."""
        return self._dicts("SELECT d.doc_id, left(d.text, ?) AS text, g.gold_label FROM documents d"
                           " LEFT JOIN gold g USING (job_id, doc_id) WHERE d.job_id = ? ORDER BY d.position",
                           [max_chars, job_id])

    def gold_label_rows(self, job_id: str) -> list[dict]:
        """Every person's label of every gold document (doc_id, annotator, label)."""
        return self._dicts("SELECT doc_id, annotator, label FROM gold_labels WHERE job_id = ? ORDER BY doc_id, annotator",
                           [job_id])

    # results ------------------------------------------------------------------
    def put_quality_tables(self, job_id: str, metrics: list[tuple], tables: dict[str, list[tuple]]) -> None:
        """Replace a job's rows in quality_metrics and the report tables (confusion_matrix, reliability, ...)."""
        now = utc_now()
        with self._transaction() as cur:
            for table in ("quality_metrics", *tables):
                cur.execute(f"DELETE FROM {table} WHERE job_id = ?", [job_id])
            if metrics:
                cur.executemany("INSERT INTO quality_metrics VALUES (?, ?, ?, ?, ?)", [[job_id, *row, now] for row in metrics])
            for table, rows in tables.items():
                if rows:
                    marks = ", ".join("?" * (len(rows[0]) + 1))
                    cur.executemany(f"INSERT INTO {table} VALUES ({marks})", [[job_id, *row] for row in rows])

    def put_calibration(self, job_id: str, result: dict) -> None:
        """Keep a job's conformal threshold (the ``labels`` view's conformal_candidates use it)."""
        abstain = result.get("abstention") or {}
        with self._transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [job_id, result["alpha"], result["threshold"], result.get("coverage"), result.get("avg_set_size"),
                 abstain.get("target_accuracy"), abstain.get("threshold"), json.dumps(result), utc_now()])

    def calibration(self, job_id: str) -> dict | None:
        """The job's last calibration result, if any."""
        row = self.cursor().execute("SELECT result FROM calibrations WHERE job_id = ?", [job_id]).fetchone()
        return None if row is None else json.loads(row[0])

    def put_label_issues(self, job_id: str, kind: str, rows: list[dict]) -> None:
        """Replace a job's ranked label issues of one kind (gold or llm)."""
        now = utc_now()
        with self._transaction() as cur:
            cur.execute("DELETE FROM label_issues WHERE job_id = ? AND kind = ?", [job_id, kind])
            if not rows:  # nothing to rank (one class): the old ranking is gone all the same
                return
            cur.executemany(
                "INSERT INTO label_issues VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [[job_id, kind, r["rank"], r["doc_id"], r["given_label"], r["suggested_label"], r["quality"],
                  r["disagreement"], r["suspicion"], r["is_issue"], now] for r in rows])
