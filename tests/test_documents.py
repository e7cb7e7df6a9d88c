"""Readers and checks for documents coming in: JSONL, CSV, Parquet; errors name the row."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.documents import batched, check_document, local_source, read_file
from service.errors import InvalidInput, PayloadTooLarge


def test_jsonl_csv_parquet_give_the_same_rows(tmp_path):
    """The three formats yield identical documents; extra columns become meta."""
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "one", "lang": "en"}\n\n{"id": "b", "text": "two", "lang": "fr"}\n')
    (tmp_path / "d.csv").write_text("id,text,lang\na,one,en\nb,two,fr\n")
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"], "lang": ["en", "fr"]}), tmp_path / "d.parquet")
    results = [list(read_file(tmp_path / f"d.{kind}", max_chars=100)) for kind in ("jsonl", "csv", "parquet")]
    assert results[0] == results[1] == results[2]
    assert [(r["doc_id"], r["text"], r["meta"]) for r in results[0]] == [("a", "one", {"lang": "en"}),
                                                                        ("b", "two", {"lang": "fr"})]


def test_ids_default_to_the_row_number(tmp_path):
    """Without an id column, ids are 1-based row numbers."""
    (tmp_path / "d.csv").write_text("text\nfirst\nsecond\n")
    assert [r["doc_id"] for r in read_file(tmp_path / "d.csv", max_chars=100)] == ["1", "2"]


def test_non_utf8_line_is_named(tmp_path):
    """A JSONL line with invalid UTF-8 is reported with its line number."""
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidInput, match=r"d.jsonl line 2: not valid UTF-8"):
        list(read_file(tmp_path / "d.jsonl", max_chars=100))


def test_bad_json_and_missing_column(tmp_path):
    """Broken JSON names the line; a CSV without the text column lists the columns it has."""
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InvalidInput, match="line 2: invalid JSON"):
        list(read_file(tmp_path / "d.jsonl", max_chars=100))
    (tmp_path / "d.csv").write_text("body\nx\n")
    with pytest.raises(InvalidInput, match="no 'text' column; columns are body"):
        list(read_file(tmp_path / "d.csv", max_chars=100))


def test_local_source_refuses_anything_that_could_lead_out_without_naming_the_server(tmp_path):
    """Absolute paths, '..' parts, links out and NUL bytes are refused; no message holds a path the caller did not give."""
    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "out.csv").symlink_to(tmp_path / "secret.csv")
    assert local_source(inputs, "sub/d.csv") == inputs.resolve() / "sub" / "d.csv"
    for source in ("../secret.csv", str(inputs / "sub" / "d.csv"), "sub/../sub/d.csv", "out.csv", "a\x00b.csv"):
        with pytest.raises(InvalidInput, match="^source") as refused:
            local_source(inputs, source)
        assert str(tmp_path) not in str(refused.value).replace(repr(source), "")  # the source as given may be


def test_read_errors_call_the_file_by_the_name_given(tmp_path):
    """The caller's name for a file stands in for its path, also inside the reader's own words."""
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(InvalidInput, match="^in/d.parquet: cannot read as parquet") as refused:
        list(read_file(tmp_path / "d.parquet", max_chars=100, name="in/d.parquet"))
    assert str(tmp_path) not in str(refused.value)
    with pytest.raises(InvalidInput, match="^in/none.csv: no such file$"):
        list(read_file(tmp_path / "none.csv", max_chars=100, name="in/none.csv"))


def test_unknown_format(tmp_path):
    """Only .jsonl, .csv and .parquet are read."""
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(InvalidInput, match="unknown format '.xml'"):
        list(read_file(tmp_path / "d.xml", max_chars=100))


def test_check_document_limits_and_types():
    """Too long is 413-class, a lone surrogate and a non-string text are 422-class."""
    with pytest.raises(PayloadTooLarge, match="documents\\[0\\].text: 11 characters is over the limit of 10"):
        check_document("documents[0]", 1, "x" * 11, None, max_chars=10)
    with pytest.raises(InvalidInput, match="surrogate"):
        check_document("documents[0]", 1, "a\ud800", None, max_chars=10)
    with pytest.raises(InvalidInput, match="must be a string"):
        check_document("documents[0]", 1, 5, None, max_chars=10)
    row = check_document("documents[0]", 7, "hé", {"k": 1}, max_chars=10)
    assert row["doc_id"] == "7" and len(row["text_hash"]) == 32 and row["meta"] == {"k": 1}


def test_batched_refuses_duplicate_ids():
    """Duplicate ids anywhere in the stream name both positions."""
    rows = [{"doc_id": "a"}, {"doc_id": "b"}, {"doc_id": "a"}]
    with pytest.raises(InvalidInput, match="document 2: duplicate id 'a' \\(first used by document 0\\)"):
        list(batched(rows, 2))
    assert [len(b) for b in batched(rows[:2] + [{"doc_id": "c"}], 2)] == [2, 1]


def test_csv_ids_and_texts_stay_strings(tmp_path):
    """Numeric-looking ids keep their leading zeros and numeric texts are texts."""
    (tmp_path / "d.csv").write_text("id,text\n007,5\n12345678901234567890123,42\n")
    rows = list(read_file(tmp_path / "d.csv", max_chars=100))
    assert [(r["doc_id"], r["text"]) for r in rows] == [("007", "5"), ("12345678901234567890123", "42")]
