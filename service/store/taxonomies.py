"""Taxonomy versions (YAML kept whole, labels as rows) and the prompt each tuning chose."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from service.errors import NotFound
from service.labelling.labeller import INFORMATIVE, TunedPrompt
from service.store.database import Database, utc_now
from service.taxonomy import Taxonomy, parse_taxonomy


@lru_cache(maxsize=16)
def _parsed(yaml_text: str, source: str) -> Taxonomy:
    """A stored version parsed once per process (a Taxonomy is frozen): every job submission, prediction and
    console page reads its taxonomy, and a large one takes a second or more to parse."""
    return parse_taxonomy(yaml_text, source=source)


@dataclass(frozen=True)
class StoredTaxonomy:
    """One stored version of a taxonomy: parsed, its content-hash version, and the YAML it was pushed as."""

    taxonomy: Taxonomy
    version: str
    yaml: str


@dataclass(frozen=True)
class Pushed:
    """The version a push stored, and whether it is new (the same YAML again only moves it to the front)."""

    version: str
    created: bool


class Taxonomies:
    """Taxonomy versions (YAML kept whole: one repository of the store (``service.store.Store``)."""

    def __init__(self, db: Database):
        self._db = db

    def put(self, taxonomy: Taxonomy, yaml_text: str) -> Pushed:
        """Store a taxonomy version (content hash) and make it the current one."""
        version = taxonomy.content_hash()
        with self._db.transaction() as cur:
            if cur.execute(
                "UPDATE taxonomies SET pushed_at = ? WHERE name = ? AND version = ? RETURNING 1",
                [utc_now(), taxonomy.name, version],
            ).fetchall():
                return Pushed(version, created=False)
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
        return Pushed(version, created=True)

    def get(self, name: str, version: str | None = None) -> StoredTaxonomy:
        """A named taxonomy: the last pushed version unless one is given."""
        sql = "SELECT version, yaml FROM taxonomies WHERE name = ?"
        params: list = [name]
        if version:
            sql += " AND version = ?"
            params.append(version)
        row = self._db.cursor().execute(sql + " ORDER BY pushed_at DESC LIMIT 1", params).fetchone()
        if row is None:
            known = [r[0] for r in self._db.cursor().execute("SELECT DISTINCT name FROM taxonomies ORDER BY 1").fetchall()]
            what = f"taxonomy {name!r}" + (f" version {version!r}" if version else "")
            raise NotFound(f"unknown {what}; known taxonomies: {', '.join(known) or 'none (push one first)'}")
        return StoredTaxonomy(_parsed(row[1], f"store:{name}@{row[0]}"), version=row[0], yaml=row[1])

    def put_tuning(self, taxonomy: str, version: str, model: str, choice: TunedPrompt, criterion: str,
                          evidence: dict) -> None:
        """Keep the prompt a tuning chose for a taxonomy version on a model (replacing an earlier one); whether it is
        ``informative`` is kept in its evidence."""
        with self._db.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO prompt_tunings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [taxonomy, version, model, choice.prompt, choice.calibration,
                         None if choice.prior is None else list(choice.prior), criterion,
                         json.dumps(evidence | {INFORMATIVE: choice.informative}),
                         utc_now()])

    def tunings(self, taxonomy: str, version: str) -> list[dict]:
        """The tunings of a taxonomy version, one per model, with their evidence."""
        rows = self._db.rows("SELECT model, prompt, calibration, prior, criterion, evidence, tuned_at FROM prompt_tunings"
                           " WHERE taxonomy = ? AND taxonomy_version = ? ORDER BY model", [taxonomy, version])
        return [{**row, "evidence": json.loads(row["evidence"])} for row in rows]

    def tuned_prompt(self, taxonomy: str, version: str, model: str) -> TunedPrompt | None:
        """The prompt (and calibration) a tuning chose for this taxonomy version and model, if one ran."""
        row = self._db.cursor().execute("SELECT prompt, calibration, prior, evidence FROM prompt_tunings WHERE taxonomy = ?"
                                    " AND taxonomy_version = ? AND model = ?", [taxonomy, version, model]).fetchone()
        if row is None:
            return None
        informative = json.loads(row[3]).get(INFORMATIVE, True)  # tunings stored before the test was made: True
        return TunedPrompt(row[0], row[1], None if row[2] is None else tuple(row[2]), informative)

    def all(self) -> list[dict]:
        """Every taxonomy version, newest first."""
        return self._db.rows(
            "SELECT name, version, label_version, description, multi_label, created_at,"
            " (SELECT count(*) FROM taxonomy_labels l WHERE l.taxonomy = t.name AND l.version = t.version) AS labels"
            " FROM taxonomies t ORDER BY name, created_at DESC"
        )

    def versions(self, name: str) -> list[dict]:
        """The versions of one taxonomy, the current (last pushed) first."""
        rows = self._db.rows(
            "SELECT version, label_version, created_at, pushed_at FROM taxonomies WHERE name = ? ORDER BY pushed_at DESC",
            [name],
        )
        if not rows:
            self.get(name)  # raises NotFound with the known names
        return rows
