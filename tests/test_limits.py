"""Each limit over real HTTP: a clear 4xx naming the setting, and nothing half-stored.

Per-document characters and SQL time and rows are in test_api_errors.py, concurrent jobs
per token in test_auth.py; here the body size, documents per job, and the taxonomy's choice
for documents longer than the model's input: truncate (flagged), reject, or chunk (all of it;
the other modes and a job's override are in test_long_documents.py).
"""

from __future__ import annotations

from conftest import REPO, sql, wait_for_job

STRICT_YAML = ((REPO / "taxonomy" / "sms-spam.yaml").read_text()
               .replace("name: sms-spam", "name: sms-strict", 1) + "long_documents: reject\n")
LONG = "Call me when you land. " * 100  # 2,300 characters, over ANNOTATE_MODEL_INPUT_CHARS (2,000)
CHUNK_YAML = ((REPO / "taxonomy" / "sms-spam.yaml").read_text()
              .replace("name: sms-spam", "name: sms-chunk", 1) + "long_documents: chunk\n")
SPEECH = "Friends, the harbour will reopen in spring and every family will have work. " * 80  # 6,080 characters


def job_count(client) -> int:
    """Jobs in the store."""
    return sql(client, "SELECT count(*) AS n FROM jobs")[0]["n"]


def test_body_over_the_limit_is_refused_before_it_is_read(service):
    """65 MiB against the 64 MiB default: 413 naming ANNOTATE_MAX_BODY_BYTES."""
    with service.client() as client:
        response = client.post("/v1/jobs", content=b"x" * (65 * 2**20), headers={"content-type": "application/json"})
        assert response.status_code == 413 and "ANNOTATE_MAX_BODY_BYTES" in response.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200


def test_too_many_documents_in_one_job(service, labelled_taxonomy):
    """100,001 documents against the 100,000 default: 413, and no job is created."""
    documents = [{"id": i, "text": "hi"} for i in range(100_001)]
    with service.client() as client:
        before = job_count(client)
        response = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "fake", "documents": documents})
        assert response.status_code == 413 and "ANNOTATE_MAX_DOCUMENTS_PER_JOB" in response.json()["error"]["message"]
        assert job_count(client) == before


def test_long_documents_are_truncated_with_a_flag_or_rejected_as_the_taxonomy_says(service, labelled_taxonomy):
    """sms-spam truncates (the row says so); sms-strict rejects the job with 413 naming the document and why."""
    documents = [{"id": "short", "text": "see you soon"}, {"id": "long", "text": LONG}]
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=STRICT_YAML.encode()).is_success
        before = job_count(client)
        refused = client.post("/v1/jobs", json={"taxonomy": "sms-strict", "model": "fake", "documents": documents})
        assert refused.status_code == 413, refused.text
        message = refused.json()["error"]["message"]
        assert "documents[1].text" in message and "2,300" in message and "long_documents: reject" in message
        assert job_count(client) == before  # nothing half-stored
        accepted = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "fake", "documents": documents})
        job_id = accepted.json()["job_id"]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        rows = sql(client, f"SELECT doc_id, truncated FROM labels WHERE job_id = '{job_id}'")
        flags = {r["doc_id"]: r["truncated"] for r in rows}
    assert flags == {"short": False, "long": True}


def test_a_chunked_taxonomy_labels_all_of_a_long_document_on_the_embedded_model(service, labelled_taxonomy):
    """sms-chunk: SmolLM2 reads every window of a 6,080-character speech; sms-spam on the same text reads 2,000."""
    documents = [{"id": "speech", "text": SPEECH}]
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=CHUNK_YAML.encode()).is_success
        chunked = client.post("/v1/jobs", json={"taxonomy": "sms-chunk", "documents": documents})  # the embedded model
        cut = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "fake", "documents": documents})
        rows = {}
        for response in (chunked, cut):
            job_id = response.json()["job_id"]
            assert wait_for_job(client, job_id)["status"] == "succeeded"
            rows[job_id] = sql(client, "SELECT l.chars_seen, l.truncated, l.confidence,"
                                       " j.annotator_spec->>'long_documents' AS mode, j.annotator_spec->>'engine' AS engine"
                                       f" FROM labels l JOIN jobs j USING (job_id) WHERE job_id = '{job_id}'")[0]
    chunk_row, cut_row = rows[chunked.json()["job_id"]], rows[cut.json()["job_id"]]
    assert (chunk_row["chars_seen"], chunk_row["truncated"], chunk_row["mode"]) == (len(SPEECH), False, "chunk")
    assert chunk_row["engine"].startswith("embedded") and 0.5 <= chunk_row["confidence"] <= 1.0
    assert (cut_row["chars_seen"], cut_row["truncated"], cut_row["mode"]) == (2000, True, None)
