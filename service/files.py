"""The one way the service writes a file or directory that others may read meanwhile: atomically."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh sibling of ``path`` to write a file or a directory at; it takes ``path``'s place in one rename.

    Readers (SQL over the exports, another replica, a download) never see half of it. When
    the block fails, the partial write is removed. A directory that another process put at
    ``path`` first (the same conversion, raced) is kept and this one dropped.
    """
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        yield partial
        try:
            os.replace(partial, path)
        except OSError:
            if not (partial.is_dir() and path.is_dir()):
                raise
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def download_path(directory: Path, suffix: str) -> Path:
    """A fresh private file for a download that is built, sent and then deleted: a read leaves nothing behind."""
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{uuid.uuid4().hex}{suffix}"
