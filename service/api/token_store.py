"""The API tokens' own small SQLite file, apart from the DuckDB store so that user SQL can never read it.

It lives in the data dir, outside the exports dir (the only files user SQL may open). Only
hashes of the secrets are kept (``service.api.security``).
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

from service.errors import NotFound

SCHEMA = """CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY, name TEXT NOT NULL, scope TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL, revoked_at TEXT)"""
PUBLIC = "token_id, name, scope, created_at, revoked_at"


class TokenStore:
    """Create, look up, list and revoke tokens; one connection behind a lock (requests come from many threads)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(SCHEMA)

    def _rows(self, sql: str, params: tuple = ()) -> list[dict]:
        """Run one statement under the lock; rows as dicts."""
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, params).fetchall()]

    def create(self, token_id: str, *, name: str, scope: str, secret_digest: str) -> dict:
        """Store a new token's record; returns it without the hash."""
        self._rows("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL)", (token_id, name, scope, secret_digest, _now()))
        return self.public(token_id)

    def get(self, token_id: str) -> dict | None:
        """One token's full record (hash included, for checking), None when unknown."""
        rows = self._rows("SELECT * FROM tokens WHERE token_id = ?", (token_id,))
        return rows[0] if rows else None

    def public(self, token_id: str) -> dict:
        """One token's record without its hash."""
        rows = self._rows(f"SELECT {PUBLIC} FROM tokens WHERE token_id = ?", (token_id,))
        if not rows:
            raise NotFound(f"unknown token {token_id!r}; `annotate token list` shows them")
        return rows[0]

    def list(self) -> list[dict]:
        """Every token, newest first, without hashes."""
        return self._rows(f"SELECT {PUBLIC} FROM tokens ORDER BY created_at DESC")

    def revoke(self, token_id: str) -> dict:
        """Mark a token revoked: requests carrying it are refused from the next one on."""
        self.public(token_id)
        self._rows("UPDATE tokens SET revoked_at = coalesce(revoked_at, ?) WHERE token_id = ?", (_now(), token_id))
        return self.public(token_id)

    def close(self) -> None:
        """Release the file."""
        with self._lock:
            self._db.close()


def _now() -> str:
    """UTC time as ISO text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
