"""Taxonomy inductions: options, progress, the induced YAML and its review report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from service.errors import NotFound
from service.store.database import Database, utc_now


@dataclass(frozen=True)
class Induction:
    """A taxonomy induction: how far it got, and its YAML and review report once it succeeded."""

    induction_id: str
    name: str
    status: str  # queued, running, succeeded or failed
    stage: str | None
    progress: float | None
    options: dict | None
    yaml: str | None
    report: dict | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class Inductions:
    """Taxonomy inductions: one repository of the store (``service.store.Store``)."""

    def __init__(self, db: Database):
        self._db = db

    def create(self, induction_id: str, name: str, options: dict) -> None:
        """Record a queued taxonomy induction."""
        with self._db.write_lock:
            self._db.cursor().execute(
                "INSERT INTO inductions (induction_id, name, status, stage, progress, options, created_at)"
                " VALUES (?, ?, 'queued', 'queued', 0, ?, ?)", [induction_id, name, json.dumps(options), utc_now()])

    def update(self, induction_id: str, *, status: str, stage: str, progress: float,
                         yaml_text: str | None = None, report: dict | None = None, error: str | None = None) -> None:
        """Move an induction along; a final status stamps finished_at."""
        finished = utc_now() if status in ("succeeded", "failed") else None
        with self._db.write_lock:
            self._db.cursor().execute(
                "UPDATE inductions SET status = ?, stage = ?, progress = ?, yaml = coalesce(?, yaml),"
                " report = coalesce(?, report), error = coalesce(?, error), finished_at = ? WHERE induction_id = ?",
                [status, stage, progress, yaml_text, None if report is None else json.dumps(report), error, finished,
                 induction_id])

    def get(self, induction_id: str) -> Induction:
        """An induction's state, and its YAML and report once done."""
        rows = self._db.rows("SELECT * FROM inductions WHERE induction_id = ?", [induction_id])
        if not rows:
            raise NotFound(f"unknown induction {induction_id!r}")
        row = rows[0]
        for key in ("options", "report"):
            row[key] = None if row[key] is None else json.loads(row[key])
        return Induction(**row)

    def interrupt(self) -> int:
        """Inductions cut off by a stop (their inputs were not kept) fail with a message; returns how many."""
        with self._db.write_lock:
            return len(self._db.cursor().execute(
                "UPDATE inductions SET status = 'failed', error = 'interrupted by a service restart; submit it again',"
                " finished_at = ? WHERE status IN ('queued', 'running') RETURNING 1", [utc_now()]).fetchall())
