"""The store: one database owner and one repository per aggregate, over a single DuckDB file.

``Store`` opens the file (``Database``: connection, lock-down, write lock, transactions,
schema) and hands it to the repositories; callers go through them, never through SQL:

- ``store.taxonomies``: taxonomy versions and prompt tunings
- ``store.jobs``: jobs, their documents, shards and annotators
- ``store.annotations``: annotations, the cache, labels read back, the console's summaries
- ``store.quality``: gold samples and labels, reports, calibrations, label issues
- ``store.classifiers``: distilled students
- ``store.inductions``: taxonomy inductions

User SQL goes through ``service.store.sandbox`` on cursors of the same instance.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from service.store.annotations import Annotations
from service.store.classifiers import Classifiers
from service.store.database import Database
from service.store.inductions import Inductions
from service.store.jobs import Jobs
from service.store.quality import Quality
from service.store.taxonomies import Taxonomies


class Store:
    """The DuckDB file and its repositories; one instance per process that holds the file."""

    def __init__(self, path: Path, *, export_dir: Path, read_only: bool = False):
        self.database = Database(path, export_dir=export_dir, read_only=read_only)
        self.taxonomies = Taxonomies(self.database)
        self.jobs = Jobs(self.database)
        self.annotations = Annotations(self.database, self.jobs)
        self.quality = Quality(self.database)
        self.classifiers = Classifiers(self.database)
        self.inductions = Inductions(self.database)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of the instance for user SQL (``service.store.sandbox``) and tests."""
        return self.database.cursor()

    def close(self) -> None:
        """Release the file once writes in flight have committed."""
        self.database.close()
