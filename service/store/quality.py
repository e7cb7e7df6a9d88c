"""Gold samples and human labels, and what is computed from them: reports, calibrations, label issues."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from service.errors import Conflict, InvalidInput, NotFound
from service.store.database import Database, as_utc, naive_utc, scalar, utc_now

_LABELLED = ("FROM gold g JOIN documents d USING (job_id, doc_id) JOIN jobs j USING (job_id)"
             " WHERE j.taxonomy = ? AND g.gold_label IS NOT NULL")  # the gold-labelled documents of a taxonomy


@dataclass(frozen=True)
class StoredResult:
    """A quality result as it was computed (by a POST, a calibration or a relabelling)."""

    result: dict
    computed_at: datetime


class Quality:
    """Gold samples and human labels: one repository of the store (``service.store.Store``)."""

    def __init__(self, db: Database):
        self._db = db

    def population(self, job_id: str, options: list[str], *, with_text: bool = False) -> dict:
        """Every labelled document of a job as arrays: its distribution over ``options``, label, gold and π.

        The texts are read only ``with_text`` (training students, auditing labels); statistics need none.
        """
        text = " l.text," if with_text else ""
        table = self._db.cursor().sql(
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

    def put_sample(self, job_id: str, *, design: str, seed: int, rows: list[tuple[str, str | None, float]],
                        replace: bool) -> None:
        """Store a drawn sample (doc_id, stratum, inclusion probability); an existing one only with ``replace``."""
        with self._db.transaction() as cur:
            existing = scalar(cur, "SELECT count(*) FROM gold_samples WHERE job_id = ?", [job_id])
            if existing and not replace:
                raise Conflict(f"job {job_id} already has a gold sample of {existing} documents; pass "
                               "'replace': true to draw a new one (gold labels given so far are kept)")
            cur.execute("DELETE FROM gold_samples WHERE job_id = ?", [job_id])
            cur.executemany("INSERT INTO gold_samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [[job_id, doc_id, design, stratum, pi, seed, utc_now()] for doc_id, stratum, pi in rows])

    def sample(self, job_id: str) -> list[dict]:
        """The sampled documents with their text, inclusion probability and human labels so far."""
        rows = self._db.rows(
            "SELECT g.doc_id, d.text, g.stratum, g.inclusion_prob, g.gold_label, g.human_annotators, g.llm_label,"
            " g.confidence FROM gold g JOIN documents d USING (job_id, doc_id) WHERE g.job_id = ? ORDER BY d.position",
            [job_id])
        if not rows:
            raise NotFound(f"job {job_id} has no gold sample; draw one first")
        return rows

    def put_labels(self, job_id: str, rows: list[tuple[str, str, str]], *, max_annotators: int) -> int:
        """Store human labels (doc_id, annotator, label) of sampled documents; a repeat by the same person replaces.

        At most ``max_annotators`` distinct people per job: agreement statistics compare every pair of them.
        """
        with self._db.transaction() as cur:
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
                                   "label the documents of the sample")
            cur.executemany("INSERT OR REPLACE INTO gold_labels VALUES (?, ?, ?, ?, ?)",
                            [[job_id, doc_id, annotator, label, utc_now()] for doc_id, annotator, label in rows])
        return len(rows)

    def documents_with_gold(self, job_id: str, max_chars: int) -> list[dict]:
        """Every document of a job in order: doc_id, its first ``max_chars`` characters, and its gold label (or None)."""
        return self._db.rows("SELECT d.doc_id, left(d.text, ?) AS text, g.gold_label FROM documents d"
                           " LEFT JOIN gold g USING (job_id, doc_id) WHERE d.job_id = ? ORDER BY d.position",
                           [max_chars, job_id])

    def gold_label_rows(self, job_id: str) -> list[dict]:
        """Every person's label of every gold document (doc_id, annotator, label)."""
        return self._db.rows("SELECT doc_id, annotator, label FROM gold_labels WHERE job_id = ? ORDER BY doc_id, annotator",
                           [job_id])

    def labelled_texts(self, taxonomy: str, limit: int = 5000, before: datetime | None = None) -> list[tuple[str, str]]:
        """(text, gold label) of the documents people labelled in the taxonomy's jobs, the most recent last.

        With ``before``, only what was known then: jobs created and labels given before it, so a
        resumed job sees the pool it started with. The label is the majority of those labels, by
        the ``gold`` view's rule (which cannot take a time).
        """
        rows = self._db.cursor().execute(
            "WITH votes AS (SELECT job_id, doc_id, label, count(*) AS n, min(created_at) AS first_at FROM gold_labels"
            " WHERE created_at < coalesce(?::TIMESTAMP, 'infinity'::TIMESTAMP) GROUP BY ALL),"
            " known AS (SELECT job_id, doc_id, first(label ORDER BY n DESC, first_at, label) AS gold_label FROM votes"
            " GROUP BY ALL)"
            " SELECT d.text, k.gold_label FROM known k JOIN gold_samples s USING (job_id, doc_id)"
            " JOIN documents d USING (job_id, doc_id) JOIN jobs j USING (job_id)"
            " WHERE j.taxonomy = ? AND j.created_at < coalesce(?::TIMESTAMP, 'infinity'::TIMESTAMP)"
            " ORDER BY j.created_at DESC, d.position LIMIT ?",
            [naive_utc(before), taxonomy, naive_utc(before), limit]).fetchall()
        return [(text, label) for text, label in reversed(rows)]

    def labelled_count(self, taxonomy: str) -> int:
        """How many documents people labelled in the taxonomy's jobs (tells when a retriever is out of date)."""
        return scalar(self._db.cursor(), f"SELECT count(*) {_LABELLED}", [taxonomy])

    def put_tables(self, job_id: str, metrics: list[tuple], tables: dict[str, list[tuple]]) -> None:
        """Replace a job's rows in quality_metrics and the report tables (confusion_matrix, reliability, ...)."""
        now = utc_now()
        with self._db.transaction() as cur:
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
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [job_id, result["alpha"], result["threshold"], result.get("coverage"), result.get("avg_set_size"),
                 abstain.get("target_accuracy"), abstain.get("threshold"), json.dumps(result), utc_now()])

    def calibration(self, job_id: str) -> dict | None:
        """The job's last calibration result, if any."""
        row = self._db.cursor().execute("SELECT result FROM calibrations WHERE job_id = ?", [job_id]).fetchone()
        return None if row is None else json.loads(row[0])

    def put_result(self, job_id: str, kind: str, result: dict) -> datetime:
        """Keep a computed quality result of a job (its report, a label-issue ranking) for reads; returns when."""
        now = utc_now()
        with self._db.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO quality_results VALUES (?, ?, ?, ?)",
                        [job_id, kind, json.dumps(result, default=_plain), now])
        return as_utc(now)

    def forget_result(self, job_id: str, kind: str) -> None:
        """Drop a computed result that no longer describes the job."""
        with self._db.transaction() as cur:
            cur.execute("DELETE FROM quality_results WHERE job_id = ? AND kind = ?", [job_id, kind])

    def result(self, job_id: str, kind: str) -> StoredResult | None:
        """A job's last computed result of a kind, and when it was computed; None when none was."""
        row = self._db.cursor().execute("SELECT result, computed_at FROM quality_results WHERE job_id = ? AND kind = ?",
                                        [job_id, kind]).fetchone()
        return None if row is None else StoredResult(json.loads(row[0]), as_utc(row[1]))

    def put_label_issues(self, job_id: str, kind: str, rows: list[dict]) -> None:
        """Replace a job's ranked label issues of one kind (gold or llm)."""
        now = utc_now()
        with self._db.transaction() as cur:
            cur.execute("DELETE FROM label_issues WHERE job_id = ? AND kind = ?", [job_id, kind])
            if not rows:  # nothing to rank (one class): the old ranking is gone all the same
                return
            cur.executemany(
                "INSERT INTO label_issues VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [[job_id, kind, r["rank"], r["doc_id"], r["given_label"], r["suggested_label"], r["quality"],
                  r["disagreement"], r["suspicion"], r["is_issue"], now] for r in rows])


def _plain(value):
    """NumPy scalars in a result, as the JSON numbers they are."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
