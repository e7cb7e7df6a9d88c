"""Faults on the real service, each checked by counting rows in DuckDB before and after.

- An OpenAI-compatible engine (the real llama.cpp server behind ``conftest.FaultyProxy``)
  that hangs past its timeout on some documents and answers garbage on others: the runner
  retries each alone (the engine's own retries are off here, to keep the test short), then
  those documents are recorded as failed with the error and the rest of the job finishes.
- The model replica killed (SIGKILL) mid-job: Serve starts a new one, the runner waits for
  it instead of failing documents, and the job finishes with every document exactly once.

The service killed as a whole is in test_service_restart.py; a failing disk in test_store_faults.py.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
from conftest import FIXTURES, FaultyProxy, sql, wait_for_job

TEXTS = [json.loads(line)["text"] for line in (FIXTURES / "sms.jsonl").read_text().splitlines()]


def annotation_counts(client, job_id: str) -> dict:
    """Rows of a job in DuckDB: all, distinct documents, ok and failed."""
    return sql(client, "SELECT count(*) AS n, count(DISTINCT doc_id) AS docs, count(*) FILTER (status = 'ok') AS ok,"
                       f" count(*) FILTER (status = 'failed') AS failed FROM annotations WHERE job_id = '{job_id}'")[0]


def test_engine_timeouts_and_garbage_fail_only_their_documents(service, labelled_taxonomy):
    """Two documents the engine cannot answer are retried, then failed with the reason; eight finish."""
    documents = [{"id": f"ok{i}", "text": f"{text} (fault test)"} for i, text in enumerate(TEXTS[:8])]  # not cached
    documents += [{"id": "stalls", "text": "STALL_ME are you coming tonight?"},
                  {"id": "garbled", "text": "GARBLE_ME call me back when you can"}]
    FaultyProxy.hits.clear()
    with service.client() as client:
        rows_before = sql(client, "SELECT count(*) AS n FROM annotations")[0]["n"]
        job_id = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "faulty",
                                               "documents": documents}).json()["job_id"]
        job = wait_for_job(client, job_id)
        counts = annotation_counts(client, job_id)
        errors = {r["doc_id"]: r["error"] for r in client.get(f"/v1/jobs/{job_id}/failures").json()}
        rows_after = sql(client, "SELECT count(*) AS n FROM annotations")[0]["n"]
    assert (job["status"], job["done"], job["failed"]) == ("succeeded", 8, 2)
    assert counts == {"n": 10, "docs": 10, "ok": 8, "failed": 2} and rows_after - rows_before == 10
    assert "Timeout" in errors["stalls"], errors
    assert "JSONDecodeError" in errors["garbled"] or "Expecting value" in errors["garbled"], errors
    assert FaultyProxy.hits["STALL_ME"] >= 2 and FaultyProxy.hits["GARBLE_ME"] >= 2  # in the batch, then alone


def model_replicas(deployment: str) -> list[psutil.Process]:
    """The Ray worker processes of a Serve deployment's replicas."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "ServeReplica" in command and deployment in command:
            found.append(process)
    return found


def test_model_replica_killed_mid_job_is_replaced_and_nothing_is_lost(service, labelled_taxonomy):
    """SIGKILL the embedded model's replica mid-job: Serve restarts it and every document is labelled once."""
    total = 120
    documents = [{"id": f"k{i:04d}", "text": f"{TEXTS[i % len(TEXTS)]} (replica test {i})"} for i in range(total)]
    with service.client() as client:
        job_id = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "smollm2",
                                               "documents": documents}).json()["job_id"]
        deadline = time.monotonic() + 300
        while client.get(f"/v1/jobs/{job_id}").json()["done"] < 32 and time.monotonic() < deadline:
            time.sleep(0.1)
        replicas = model_replicas("ModelServer-smollm2")
        assert len(replicas) == 1, [r.info["cmdline"] for r in replicas]
        before = annotation_counts(client, job_id)
        replicas[0].send_signal(signal.SIGKILL)
        job = wait_for_job(client, job_id)
        after = annotation_counts(client, job_id)
    assert 32 <= before["n"] < total, "the kill should land mid-job"
    assert (job["status"], job["done"], job["failed"]) == ("succeeded", total, 0), job
    assert after == {"n": total, "docs": total, "ok": total, "failed": 0}
    assert [p.pid for p in model_replicas("ModelServer-smollm2")] != [replicas[0].pid]
