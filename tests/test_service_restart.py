"""A service killed mid-job and started again finishes the job with every document exactly once.

Real processes throughout: `annotate serve` and every Ray process it started get SIGKILL
(a crash: no shutdown code runs, DuckDB replays its write-ahead log) while the embedded
model is labelling; a new `annotate serve` opens the same DuckDB file, resumes the job, and
the annotation counts are read back through SQL. (A graceful SIGTERM is what ends every
test session, which checks no process outlives it; resuming after one is test_jobs.py's.)
"""

from __future__ import annotations

import json
import time

from conftest import FIXTURES, sql, wait_for_job

DOCUMENTS = 150


def test_restart_mid_job_loses_and_duplicates_nothing(service, labelled_taxonomy):
    """Killed after some batches are committed; after restart the job completes with 150 distinct rows."""
    texts = [json.loads(line)["text"] for line in (FIXTURES / "sms.jsonl").read_text().splitlines()]
    documents = [{"id": f"r{i:04d}", "text": f"{texts[i % len(texts)]} (message {i})"} for i in range(DOCUMENTS)]
    with service.client() as client:
        job_id = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents}).json()["job_id"]
        deadline = time.monotonic() + 300
        while client.get(f"/v1/jobs/{job_id}").json()["done"] < 32 and time.monotonic() < deadline:
            time.sleep(0.2)
        committed = sql(client, f"SELECT count(*) AS n FROM annotations WHERE job_id = '{job_id}'")[0]["n"]
    service.kill()
    service.start()
    with service.client() as client:
        before = sql(client, f"SELECT count(*) AS n FROM annotations WHERE job_id = '{job_id}'")[0]["n"]
        job = wait_for_job(client, job_id)
        counts = sql(client, "SELECT count(*) AS n, count(DISTINCT doc_id) AS docs FROM annotations"
                             f" WHERE job_id = '{job_id}'")
    assert 32 <= committed < DOCUMENTS, "the kill should land mid-job"
    assert committed <= before, "what was committed before the kill must survive it"
    assert (job["status"], job["done"], job["failed"]) == ("succeeded", DOCUMENTS, 0)
    assert counts == [{"n": DOCUMENTS, "docs": DOCUMENTS}]
