"""What each annotator said of each document, the cache of earlier answers, and the labels read back."""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow as pa

from service.labelling.labeller import Annotation
from service.store.database import ANNOTATION_SCHEMA, Database, scalar, utc_now
from service.store.jobs import Jobs
from service.vocabulary import DocumentFilter, values

DOCUMENT_FILTERS = values(DocumentFilter)


class Annotations:
    """What each annotator said of each document: one repository of the store (``service.store.Store``)."""

    def __init__(self, db: Database, jobs: Jobs):
        self._db = db
        self._jobs = jobs  # labels are read of a job that exists

    def cached(self, annotator: str, text_hashes: list[str]) -> dict[str, Annotation]:
        """Earlier successful annotations of the same text by the same annotator, by text hash."""
        if not text_hashes:
            return {}
        cur = self._db.cursor()
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

    def write(self, rows: list[dict]) -> None:
        """Append a batch of annotation rows atomically; rows already present are kept as they were."""
        if not rows:
            return
        table = self._annotation_table(rows)
        with self._db.write_lock:
            cur = self._db.cursor()
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
        self._jobs.state(job_id)  # NotFound for an unknown job
        return self._db.cursor().sql(
            "SELECT doc_id, label, labels, confidence, candidates, conformal_candidates, abstained, abstain_reason,"
            " distribution, truncated, chars_seen, cached FROM labels WHERE job_id = ? ORDER BY position",
            params=[job_id],
        ).to_arrow_reader(batch_size)

    def failures(self, job_id: str) -> list[dict]:
        """Documents that failed, with their errors."""
        return self._db.rows(
            "SELECT doc_id, error FROM annotations WHERE job_id = ? AND status = 'failed' ORDER BY doc_id", [job_id]
        )

    def member_rows(self, job_id: str) -> list[dict]:
        """Every annotator's row for every document of a job (its own output excluded), with the text hash."""
        rows = self._db.rows(
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
        with self._db.transaction() as cur:
            cur.execute("DELETE FROM annotations WHERE job_id = ? AND annotator = ?", [job_id, annotator])
            cur.register("annotation_batch", table)
            cur.execute("INSERT INTO annotations BY NAME SELECT * FROM annotation_batch")
            cur.unregister("annotation_batch")
            cur.execute("UPDATE jobs SET annotator_spec = json_merge_patch(annotator_spec, ?) WHERE job_id = ?",
                        [json.dumps({"aggregation": method, "refinement": refinement}), job_id])

    def merge_cascade(self, job_id: str, output: str, student: str, llm: str, threshold: float) -> None:
        """A cascade's labels: the LLM's where it was asked, the student's elsewhere, in one transaction."""
        with self._db.transaction() as cur:
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

    def label_counts(self, job_id: str) -> list[dict]:
        """Documents per predicted label (abstentions apart), most frequent first."""
        return self._db.rows(
            "SELECT label, count(*) AS n FROM labels WHERE job_id = ? AND NOT abstained AND label IS NOT NULL"
            " GROUP BY label ORDER BY n DESC, label", [job_id])

    def abstention_counts(self, job_id: str) -> list[dict]:
        """Abstained documents per reason, most frequent first."""
        return self._db.rows(
            "SELECT coalesce(abstain_reason, '(no reason given)') AS reason, count(*) AS n FROM labels"
            " WHERE job_id = ? AND abstained GROUP BY ALL ORDER BY n DESC, reason", [job_id])

    def document_page(self, job_id: str, *, label: str | None, show: str, below: float, offset: int,
                      limit: int) -> tuple[list[dict], int]:
        """One page of a job's documents under a filter, in input order, and how many match in all."""
        params: list[object]
        if show == "failed":
            where, params = "a.status = 'failed'", []
        else:
            where = {"all": "TRUE", "abstained": "a.status = 'ok' AND a.abstained",
                     "low_confidence": "a.status = 'ok' AND NOT a.abstained AND a.confidence < ?"}[show]
            params = [below] if show == "low_confidence" else []
        if label:
            where += " AND a.label = ?"
            params.append(label)
        source = ("FROM annotations a JOIN jobs j ON j.job_id = a.job_id AND j.annotator = a.annotator"
                  " JOIN documents d ON d.job_id = a.job_id AND d.doc_id = a.doc_id"
                  " LEFT JOIN calibrations c ON c.job_id = a.job_id"
                  f" WHERE a.job_id = ? AND {where}")
        total = scalar(self._db.cursor(), f"SELECT count(*) {source}", [job_id, *params])
        rows = self._db.rows(
            "SELECT a.doc_id, d.text, a.label, a.confidence, a.abstained, a.abstain_reason, a.candidates, a.error,"
            " map_entries(a.distribution) AS distribution, c.threshold AS conformal_threshold"
            f" {source} ORDER BY d.position LIMIT ? OFFSET ?", [job_id, *params, limit, offset])
        for row in rows:
            row["distribution"] = sorted(((e["key"], e["value"]) for e in row["distribution"] or []),
                                         key=lambda kv: -kv[1])
        return rows, total


def annotation_row(annotation: Annotation, **keys) -> dict:
    """Flatten an Annotation plus its identifying keys into a row of ANNOTATION_SCHEMA."""
    row = asdict(annotation)
    row["distribution"] = list(row["distribution"].items())
    row.update(keys)
    row.setdefault("created_at", utc_now())
    return row
