"""A service stopped or killed mid-job and started again finishes the job with every document exactly once.

Real processes throughout: `annotate serve` gets SIGTERM (a graceful stop), or it and every
Ray process it started get SIGKILL (a crash: no shutdown code runs, DuckDB replays its
write-ahead log), while the embedded model is labelling; a new `annotate serve` opens the
same DuckDB file, resumes the job, and the annotation counts are read back through SQL.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import FIXTURES, sql, wait_for_job

DOCUMENTS = 300


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_restart_mid_job_loses_and_duplicates_nothing(service, labelled_taxonomy, stop):
    """Stopped after some batches are committed; after restart the job completes with 300 distinct rows."""
    texts = [json.loads(line)["text"] for line in (FIXTURES / "sms.jsonl").read_text().splitlines()]
    documents = [{"id": f"r{i:04d}", "text": f"{texts[i % len(texts)]} ({stop} message {i})"} for i in range(DOCUMENTS)]
    with service.client() as client:
        job_id = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents}).json()["job_id"]
        deadline = time.monotonic() + 300
        while client.get(f"/v1/jobs/{job_id}").json()["done"] < 32 and time.monotonic() < deadline:
            time.sleep(0.2)
        committed = sql(client, f"SELECT count(*) AS n FROM annotations WHERE job_id = '{job_id}'")[0]["n"]
    if stop == "sigterm":
        service.stop()
    else:
        service.kill()
    service.start()
    with service.client() as client:
        before = sql(client, f"SELECT count(*) AS n FROM annotations WHERE job_id = '{job_id}'")[0]["n"]
        job = wait_for_job(client, job_id)
        counts = sql(client, "SELECT count(*) AS n, count(DISTINCT doc_id) AS docs FROM annotations"
                             f" WHERE job_id = '{job_id}'")
    assert 32 <= committed <= before < DOCUMENTS, "the stop should land mid-job and keep what was committed"
    assert (job["status"], job["done"], job["failed"]) == ("succeeded", DOCUMENTS, 0)
    assert counts == [{"n": DOCUMENTS, "docs": DOCUMENTS}]
