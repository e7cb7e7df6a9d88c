"""Batch jobs through Ray Data: shards planned, labelled on the model deployment, written as Parquet, registered.

Real parts throughout: the service under test (Ray Serve, DuckDB file), Ray Data tasks
calling the model deployment, Parquet shard files. The large corpus is labelled by the
``slow-fake`` model (word overlap, 1 ms of simulated compute per document, one batch at
a time): 20,000 documents through SmolLM2 would take about 40 minutes on 2 cores, and
what this test checks is the shard pipeline and its restart, not labelling quality. The
small-corpus test runs the real embedded model and compares against stream jobs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FIXTURES, sql, wait_for_job

from service.errors import InvalidInput
from service.settings import Settings
from service.work.batch import open_source

LARGE = 20_000
SHARD = 2_000


def _texts() -> list[str]:
    """The fixture's SMS texts."""
    return [json.loads(line)["text"] for line in (FIXTURES / "sms.jsonl").read_text().splitlines()]


def test_batch_job_labels_like_a_stream_job(service, labelled_taxonomy):
    """The same 48 documents as a 3-shard batch job and as a stream job get the same labels."""
    texts = [f"{t} (message {i})" for i, t in enumerate(_texts() * 5)][:48]
    source = service.input_dir / "small.jsonl"
    source.write_text("".join(json.dumps({"id": f"s{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts)))
    with service.client() as client:
        created = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "source": "small.jsonl", "mode": "batch",
                                                "shard_size": 16})
        assert created.status_code == 202, created.text
        batch_job = created.json()["job_id"]
        assert created.json()["total"] == 48
        stream_job = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": [
            {"id": f"s{i:02d}", "text": t} for i, t in enumerate(texts)]}).json()["job_id"]
        finished = wait_for_job(client, batch_job)
        wait_for_job(client, stream_job)
        pairs = sql(client, "SELECT b.doc_id, b.label AS batch_label, s.label AS stream_label FROM labels b"
                            f" JOIN labels s ON s.doc_id = b.doc_id AND s.job_id = '{stream_job}'"
                            f" WHERE b.job_id = '{batch_job}'")
        shards = sql(client, f"SELECT shard, rows, path FROM job_shards WHERE job_id = '{batch_job}' ORDER BY shard")
    assert (finished["status"], finished["mode"], finished["done"], finished["shards_done"]) == \
        ("succeeded", "batch", 48, 3)
    assert len(pairs) == 48
    assert all(p["batch_label"] == p["stream_label"] for p in pairs), pairs
    assert [s["rows"] for s in shards] == [16, 16, 16]
    assert sum(pq.read_metadata(s["path"]).num_rows for s in shards) == 48


def test_bad_rows_fail_alone_in_a_batch_job(service, labelled_taxonomy):
    """A line of broken JSON and a row without text are recorded as failed; the other rows are labelled."""
    lines = [json.dumps({"id": "ok1", "text": "Free entry to win a prize"}), "{not json", "",
             json.dumps({"id": "notext"}), json.dumps({"id": "ok2", "text": "See you at lunch"})]
    (service.input_dir / "broken.jsonl").write_text("\n".join(lines) + "\n")
    with service.client() as client:
        created = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "source": "broken.jsonl", "mode": "batch",
                                                "model": "fake"}).json()
        job = wait_for_job(client, created["job_id"])
        failures = client.get(f"/v1/jobs/{created['job_id']}/failures").json()
    assert created["total"] == 4, "the blank line is not a document"
    assert (job["status"], job["done"], job["failed"]) == ("succeeded", 2, 2)
    assert {f["doc_id"] for f in failures} == {"#2", "notext"}
    assert "invalid JSON" in next(f["error"] for f in failures if f["doc_id"] == "#2")


def test_duplicate_ids_fail_a_batch_job_by_name(service, labelled_taxonomy):
    """Ids repeated across shards stop the job with a message naming the id; nothing is silently dropped."""
    rows = [{"id": f"d{i % 5}", "text": f"message {i}"} for i in range(8)]
    (service.input_dir / "dupes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with service.client() as client:
        job_id = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "source": "dupes.jsonl", "mode": "batch",
                                               "model": "fake", "shard_size": 5}).json()["job_id"]
        job = wait_for_job(client, job_id)
    assert job["status"] == "failed" and "occurs more than once" in job["error"], job


def test_batch_job_rejects_what_it_cannot_read(service, labelled_taxonomy):
    """Batch mode needs a server-side .jsonl or .parquet source inside the input dir."""
    (service.input_dir / "docs.csv").write_text("id,text\n1,hello\n")
    with service.client() as client:
        inline = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "mode": "batch", "documents": [{"text": "x"}]})
        csv = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "mode": "batch", "source": "docs.csv"})
        escape = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "mode": "batch", "source": "../x.jsonl"})
        remote = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "mode": "batch", "source": "s3://b/x.jsonl"})
    assert inline.status_code == 422 and "mode 'batch'" in inline.json()["error"]["message"]
    assert csv.status_code == 422 and ".jsonl (one JSON object a line) or .parquet" in csv.json()["error"]["message"]
    assert escape.status_code == 422 and "outside the input directory" in escape.json()["error"]["message"]
    assert remote.status_code == 422 and "ANNOTATE_ALLOW_REMOTE_SOURCES" in remote.json()["error"]["message"]


@pytest.mark.parametrize("source", ["a\x00b.jsonl", "s3://b/a\x00b.jsonl", "../x.jsonl", "/etc/x.jsonl"])
def test_batch_sources_that_cannot_be_opened_are_refused_by_name(tmp_path, source):
    """A NUL byte, local or in a URI, is a 4xx like an escape, naming the source and no server path."""
    settings = Settings(data_dir=tmp_path / "data", input_dir=tmp_path / "inputs", allow_remote_sources=True)
    with pytest.raises(InvalidInput, match="^source") as refused:
        open_source(source, settings)
    assert str(tmp_path) not in str(refused.value)


def test_remote_sources_cannot_choose_endpoints_or_credentials(tmp_path):
    """SSRF: an endpoint_override in the URI would send the service's signed requests to the caller's host."""
    settings = Settings(data_dir=tmp_path / "data", input_dir=tmp_path / "inputs", allow_remote_sources=True)
    for source in ("s3://bucket/x.jsonl?endpoint_override=127.0.0.1:9&scheme=http", "s3://key:secret@bucket/x.jsonl",
                   "gs://bucket/x.jsonl#frag"):
        with pytest.raises(InvalidInput, match="no query, fragment or user part"):
            open_source(source, settings)


def test_batch_restart_mid_job_loses_and_duplicates_nothing(service, labelled_taxonomy):
    """20,000 documents in 10 shards; SIGTERM after 2 shards; after restart every document is labelled once.

    Shards registered before the stop are neither relabelled nor registered again.
    """
    texts = _texts()
    source = service.input_dir / "large.jsonl"
    with open(source, "w") as handle:
        for i in range(LARGE):
            handle.write(json.dumps({"id": f"L{i:05d}", "text": f"{texts[i % len(texts)]} #{i}"}) + "\n")
    with service.client() as client:
        created = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "source": "large.jsonl", "mode": "batch",
                                                "model": "slow-fake"}).json()
        job_id = created["job_id"]
        deadline = time.monotonic() + 300
        while client.get(f"/v1/jobs/{job_id}").json()["shards_done"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        registered = sql(client, f"SELECT shard, registered_at FROM job_shards WHERE job_id = '{job_id}'"
                                 " AND registered_at IS NOT NULL")
    service.stop()
    service.start()
    with service.client() as client:
        job = wait_for_job(client, job_id, timeout_s=900)
        counts = sql(client, "SELECT count(*) AS n, count(DISTINCT doc_id) AS docs FROM annotations"
                             f" WHERE job_id = '{job_id}'")
        kept = sql(client, f"SELECT shard, registered_at FROM job_shards WHERE job_id = '{job_id}'"
                           f" AND shard IN ({', '.join(str(r['shard']) for r in registered)})")
        shard_files = sql(client, f"SELECT count(*) AS n FROM job_shards WHERE job_id = '{job_id}'"
                                  " AND registered_at IS NOT NULL")
    assert created["total"] == LARGE
    assert 2 <= len(registered) < LARGE // SHARD, "the stop should land mid-job"
    assert (job["status"], job["done"], job["failed"], job["shards"]) == ("succeeded", LARGE, 0, LARGE // SHARD)
    assert counts == [{"n": LARGE, "docs": LARGE}]
    assert sorted(kept, key=lambda r: r["shard"]) == sorted(registered, key=lambda r: r["shard"])
    assert shard_files == [{"n": LARGE // SHARD}]


def test_a_damaged_parquet_source_is_refused_by_name(tmp_path):
    """A .parquet file that is not Parquet is a 4xx naming the source (pyarrow's 500 before), with no server path."""
    from service.work.batch import BatchRunner

    settings = Settings(data_dir=tmp_path / "data", input_dir=tmp_path / "inputs")
    settings.input_dir.mkdir(parents=True)
    (settings.input_dir / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InvalidInput, match="^source 'bad.parquet' cannot be read as parquet") as refused:
        BatchRunner(None, settings, {}, "annotate").plan("bad.parquet")
    assert str(tmp_path) not in str(refused.value)


def test_a_job_cannot_raise_the_shard_size_or_plan_unbounded_shards(tmp_path, monkeypatch):
    """A job's shard_size may lower ANNOTATE_SHARD_SIZE, not raise it (one shard is one task's memory), and a plan of
    more than ``MAX_SHARDS`` shards is refused before any is kept, naming shard_size."""
    import service.work.batch as batch

    settings = Settings(data_dir=tmp_path / "data", input_dir=tmp_path / "inputs", shard_size=10)
    settings.input_dir.mkdir(parents=True)
    (settings.input_dir / "docs.jsonl").write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(40)))
    runner = batch.BatchRunner(None, settings, {}, "annotate")
    with pytest.raises(InvalidInput, match="shard_size 11 is over ANNOTATE_SHARD_SIZE"):
        runner.plan("docs.jsonl", 11)
    assert [s["rows"] for s in runner.plan("docs.jsonl", 10)[0]] == [10] * 4
    monkeypatch.setattr(batch, "MAX_SHARDS", 3)
    with pytest.raises(InvalidInput, match="more than 3 shards .* give a larger shard_size"):
        runner.plan("docs.jsonl", 10)


def test_hdfs_is_not_a_remote_source(tmp_path):
    """hdfs:// names its host and port in the URI, so a caller would choose where the service connects: not remote."""
    settings = Settings(data_dir=tmp_path / "data", input_dir=tmp_path / "inputs", allow_remote_sources=True)
    with pytest.raises(InvalidInput, match="^source"):
        open_source("hdfs://10.0.0.1:8020/x.jsonl", settings)


def test_the_data_dir_cannot_lie_among_the_inputs(tmp_path):
    """Callers name sources under the input dir, so the service's own files may not be there: refused at start. By
    default sources come from ./inputs, not the working directory the data dir lies in."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ANNOTATE_DATA_DIR=.* lies inside ANNOTATE_INPUT_DIR"):
        Settings(data_dir=tmp_path / "in" / "data", input_dir=tmp_path / "in")
    with pytest.raises(ValidationError, match="lies inside"):
        Settings(data_dir=tmp_path, input_dir=tmp_path)
    assert Settings(data_dir=tmp_path / "data", input_dir=tmp_path / "in").input_dir == tmp_path / "in"
    assert Settings.model_fields["input_dir"].default == Path("inputs")
