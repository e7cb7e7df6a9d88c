"""The store's reads for the web console (a part of ``Store``): summaries and pages of one job's labels.

Kept apart from ``service.store.database`` only for size: the same single DuckDB owner, reading the
tables declared in ``store.SCHEMA``.
"""

from __future__ import annotations

DOCUMENT_FILTERS = ("all", "abstained", "low_confidence", "failed")


class ConsoleStore:
    """Label counts, abstention reasons and filtered pages of documents."""

    def label_counts(self, job_id: str) -> list[dict]:
        """Documents per predicted label (abstentions apart), most frequent first."""
        return self._dicts(
            "SELECT label, count(*) AS n FROM labels WHERE job_id = ? AND NOT abstained AND label IS NOT NULL"
            " GROUP BY label ORDER BY n DESC, label", [job_id])

    def abstention_counts(self, job_id: str) -> list[dict]:
        """Abstained documents per reason, most frequent first."""
        return self._dicts(
            "SELECT coalesce(abstain_reason, '(no reason given)') AS reason, count(*) AS n FROM labels"
            " WHERE job_id = ? AND abstained GROUP BY ALL ORDER BY n DESC, reason", [job_id])

    def document_page(self, job_id: str, *, label: str | None, show: str, below: float, offset: int,
                      limit: int) -> tuple[list[dict], int]:
        """One page of a job's documents under a filter, in input order, and how many match in all."""
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
        total = self.cursor().execute(f"SELECT count(*) {source}", [job_id, *params]).fetchone()[0]
        rows = self._dicts(
            "SELECT a.doc_id, d.text, a.label, a.confidence, a.abstained, a.abstain_reason, a.candidates, a.error,"
            " map_entries(a.distribution) AS distribution, c.threshold AS conformal_threshold"
            f" {source} ORDER BY d.position LIMIT ? OFFSET ?", [job_id, *params, limit, offset])
        for row in rows:
            row["distribution"] = sorted(((e["key"], e["value"]) for e in row["distribution"] or []),
                                         key=lambda kv: -kv[1])
        return rows, total
