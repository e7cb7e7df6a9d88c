"""Documents in: validation of inline documents and streaming readers for JSONL, CSV and Parquet.

Every reader yields plain dicts ``{"doc_id", "text", "text_hash", "meta"}`` in batches,
so a corpus of any size passes through in bounded memory. Problems name the document
(``documents[3].text``, ``corpus.csv row 17``) and the fix.

A caller's ``source`` is named in errors as the caller gave it, never as the server resolved
it, and nothing is said about files outside ANNOTATE_INPUT_DIR (``local_source``). Inside
it, a file's columns may be listed: every caller with a token that submits jobs can label,
and so read, any file there already.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from service.errors import AnnotateError, InvalidInput, PayloadTooLarge

FORMATS = ("jsonl", "csv", "parquet")
READ_BATCH = 4096
_RELATIVE = "name a file by its path relative to the input directory (ANNOTATE_INPUT_DIR)"


def local_source(input_dir: Path, source: str) -> Path:
    """A server-side source resolved inside the input directory; anything that could lead out is refused.

    An absolute path or a '..' part is refused from the text alone, before the file system is
    asked, and a link inside that leads out gets the same message, so a caller cannot tell
    whether a file outside exists."""
    if "\x00" in source:
        raise InvalidInput(f"source: contains a NUL byte; {_RELATIVE}")
    root = Path(input_dir).resolve()
    given = Path(source)
    path = None if given.is_absolute() or ".." in given.parts else (root / given).resolve()
    if path is None or not path.is_relative_to(root):
        raise InvalidInput(f"source {source!r} is outside the input directory; {_RELATIVE}")
    return path


def text_hash(text: str) -> str:
    """Content hash of a text: half of the annotation cache key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


CHARS_SETTING = "ANNOTATE_MAX_DOCUMENT_CHARS"  # named in the error; a stricter caller's limit replaces it


def check_document(where: str, doc_id: object, text: object, meta: object, *, max_chars: int) -> dict:
    """Validate one document and return it as a store row; ``where`` names it in errors."""
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
        raise InvalidInput(f"{where}.id: missing; give every document an id (string or integer)")
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
        raise InvalidInput(f"{where}.id: must be a string or integer, got {type(doc_id).__name__}")
    if not isinstance(text, str):
        raise InvalidInput(f"{where}.text: must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise PayloadTooLarge(
            f"{where}.text: {len(text):,} characters is over the limit of {max_chars:,} ({CHARS_SETTING}); split "
            "the document or raise the limit"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{where}.text: not valid Unicode at character {exc.start} (a lone surrogate); send UTF-8 text"
        ) from exc
    if meta is not None and not isinstance(meta, dict):
        raise InvalidInput(f"{where}.meta: must be an object, got {type(meta).__name__}")
    return {"doc_id": str(doc_id), "text": text, "text_hash": text_hash(text),
            "meta": meta or {}}


def check_record(where: str, record: object, number: int, *, text_field: str, id_field: str, max_chars: int) -> dict:
    """A JSON object or table row as a validated document: other fields become ``meta``, ids default to ``number``."""
    if not isinstance(record, dict) or text_field not in record:
        raise InvalidInput(f"{where}: expected an object with a {text_field!r} field")
    meta = record.get("meta", {k: v for k, v in record.items() if k not in (text_field, id_field) and v is not None})
    return check_document(where, record.get(id_field, number), record[text_field],
                          json.loads(json.dumps(meta, default=str)), max_chars=max_chars)


def batched(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Group rows into lists of ``size``, refusing duplicate ids across the whole stream."""
    seen: dict[str, int] = {}
    batch: list[dict] = []
    for position, row in enumerate(rows):
        first = seen.setdefault(row["doc_id"], position)
        if first != position:
            raise InvalidInput(
                f"document {position}: duplicate id {row['doc_id']!r} (first used by document {first}); ids must be unique"
            )
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_file(path: Path, *, text_field: str = "text", id_field: str = "id", max_chars: int,
              name: str | None = None) -> Iterator[dict]:
    """Stream validated documents from a JSONL, CSV or Parquet file, chosen by extension.

    Errors call the file ``name`` (a caller's ``source`` as given; default the file's own
    name), never by the directory it lies in."""
    path = Path(path)
    name = name or path.name
    kind = path.suffix.lower().lstrip(".")
    if kind == "json":
        kind = "jsonl"
    if kind not in FORMATS:
        raise InvalidInput(f"{name}: unknown format {path.suffix!r}; use one of .jsonl, .csv, .parquet")
    if not path.is_file():
        raise InvalidInput(f"{name}: no such file")
    try:
        if kind == "jsonl":
            yield from _read_jsonl(path, name, text_field, id_field, max_chars)
        else:
            yield from _read_columnar(path, name, kind, text_field, id_field, max_chars)
    except AnnotateError:
        raise
    except (OSError, ValueError) as exc:  # the reader's own words, with the server's path taken out
        raise InvalidInput(f"{name}: cannot read as {kind}: {str(exc).replace(str(path), name)}") from exc


def _read_jsonl(path: Path, name: str, text_field: str, id_field: str, max_chars: int) -> Iterator[dict]:
    """One JSON object per line; blank lines are skipped; ids default to the line number."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{name} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"{where}: not valid UTF-8 at byte {exc.start}; re-encode the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            yield check_record(where, record, number, text_field=text_field, id_field=id_field, max_chars=max_chars)


def _read_columnar(path: Path, name: str, kind: str, text_field: str, id_field: str, max_chars: int) -> Iterator[dict]:
    """CSV or Parquet in Arrow batches; other columns become ``meta``; ids default to the row number."""
    batches = (
        pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH)
        if kind == "parquet"
        else pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22),
                            convert_options=pacsv.ConvertOptions(
                                column_types={text_field: pa.string(), id_field: pa.string()}))
    )
    row_number = 0
    for batch in batches:
        columns = batch.schema.names
        if text_field not in columns:
            raise InvalidInput(f"{name}: no {text_field!r} column; columns are {', '.join(columns)}")
        for record in batch.to_pylist():
            row_number += 1
            yield check_record(f"{name} row {row_number}", record, row_number, text_field=text_field,
                               id_field=id_field, max_chars=max_chars)
