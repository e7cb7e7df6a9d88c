"""Distilled students: each version of a name, its training jobs, options and report."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime

from service.errors import NotFound
from service.store.database import Database, scalar, utc_now

JSON_COLUMNS = ("jobs", "options", "classes", "report")


@dataclass(frozen=True)
class ClassifierSummary:
    """A student in the list of students."""

    classifier_id: str
    name: str
    version: int
    kind: str
    taxonomy: str
    taxonomy_version: str
    jobs: list[str]
    status: str  # training, ready or failed
    size_bytes: int | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Classifier(ClassifierSummary):
    """A student with its options, classes, evaluation report, directory and error."""

    options: dict | None = None
    classes: list[str] | None = None
    report: dict | None = None
    path: str | None = None
    error: str | None = None


class Classifiers:
    """Distilled students: one repository of the store (``service.store.Store``)."""

    def __init__(self, db: Database):
        self._db = db

    def create(self, classifier_id: str, *, name: str, kind: str, taxonomy: str, taxonomy_version: str,
               jobs: list[str], options: dict) -> int:
        """Record a student being trained as the next version of ``name``; returns that version."""
        with self._db.transaction() as cur:
            version = scalar(cur, "SELECT coalesce(max(version), 0) + 1 FROM classifiers WHERE name = ?", [name])
            cur.execute("INSERT INTO classifiers (classifier_id, name, version, kind, taxonomy, taxonomy_version, jobs,"
                        " options, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'training', ?)",
                        [classifier_id, name, version, kind, taxonomy, taxonomy_version, json.dumps(jobs),
                         json.dumps(options), utc_now()])
        return version

    def finish(self, classifier_id: str, *, report: dict | None = None, path: str | None = None,
               error: str | None = None) -> None:
        """Mark a student ready (with its report and directory) or failed (with the error)."""
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE classifiers SET status = ?, classes = ?, report = ?, path = ?, size_bytes = ?, error = ?,"
                " finished_at = ? WHERE classifier_id = ?",
                ["failed" if error else "ready", json.dumps(report["classes"]) if report else None,
                 json.dumps(report) if report else None, path, report["size_bytes"] if report else None, error,
                 utc_now(), classifier_id])

    def get(self, ref: str) -> Classifier:
        """A student by id, or the newest ready version of a name."""
        rows = self._db.rows("SELECT * FROM classifiers WHERE classifier_id = ? OR (name = ? AND status = 'ready')"
                           " ORDER BY classifier_id = ? DESC, version DESC LIMIT 1", [ref, ref, ref])
        if not rows:
            raise NotFound(f"unknown classifier {ref!r} (an id, or the name of one that finished training); "
                           "the list of classifiers names them")
        return Classifier(**_decoded(rows[0]))

    def all(self) -> list[ClassifierSummary]:
        """Every student, newest first (reports left out)."""
        columns = ", ".join(field.name for field in fields(ClassifierSummary))
        return [ClassifierSummary(**_decoded(r))
                for r in self._db.rows(f"SELECT {columns} FROM classifiers ORDER BY created_at DESC")]

    def interrupt(self) -> int:
        """Trainings cut off by a stop fail with a message; returns how many."""
        with self._db.transaction() as cur:
            return len(cur.execute(
                "UPDATE classifiers SET status = 'failed', error = 'interrupted by a service restart; train it again',"
                " finished_at = ? WHERE status = 'training' RETURNING 1", [utc_now()]).fetchall())


def _decoded(row: dict) -> dict:
    """A classifiers row with its JSON columns parsed."""
    return {k: json.loads(v) if k in JSON_COLUMNS and isinstance(v, str) else v for k, v in row.items()}
