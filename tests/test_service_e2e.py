"""End to end: the real Serve app labels real documents with the real embedded model over HTTP.

Nothing is mocked: `annotate serve` runs Ray Serve with SmolLM2 on the CPU, results land
in a real DuckDB file, and every check reads them back through /v1/sql or the API.
"""

from __future__ import annotations

import io
import json
import math

import pyarrow.parquet as pq
import pytest
from conftest import FIXTURES, REPO, sql, wait_for_job

TAXONOMY = REPO / "taxonomy" / "sms-spam.yaml"


def _documents() -> list[dict]:
    """The fixture corpus: ten SMS-like messages, one with a prompt injection."""
    return [json.loads(line) for line in (FIXTURES / "sms.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def labelled(service):
    """Push the SMS taxonomy and label the fixture corpus once for this module."""
    with service.client() as client:
        pushed = client.post("/v1/taxonomies", content=TAXONOMY.read_bytes(),
                             headers={"content-type": "application/yaml"})
        assert pushed.status_code in (200, 201), pushed.text
        submitted = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": _documents()})
        assert submitted.status_code == 202, submitted.text
        job = wait_for_job(client, submitted.json()["job_id"])
    return {"job": job, "version": pushed.json()["version"]}


def test_job_labels_every_document(service, labelled):
    """All ten documents are done, none failed, and the counts agree with the tables."""
    job = labelled["job"]
    assert job["status"] == "succeeded"
    assert (job["total"], job["done"], job["failed"]) == (10, 10, 0)
    with service.client() as client:
        rows = sql(client, f"SELECT count(*) AS n FROM labels WHERE job_id = '{job['job_id']}'")
    assert rows == [{"n": 10}]


def test_distributions_candidates_and_abstentions(service, labelled):
    """Distributions sum to 1, candidates start with the top label, abstentions carry reasons."""
    job_id = labelled["job"]["job_id"]
    with service.client() as client:
        rows = sql(client, "SELECT doc_id, distribution, label, confidence, candidates, abstained, abstain_reason,"
                           f" list_sum(map_values(distribution)) AS mass FROM labels WHERE job_id = '{job_id}'")
    assert len(rows) == 10
    for row in rows:
        assert math.isclose(row["mass"], 1.0, abs_tol=1e-6)
        assert set(row["distribution"]) == {"ham", "spam"}
        top = max(row["distribution"], key=row["distribution"].get)
        assert row["candidates"][0] == top
        assert math.isclose(row["confidence"], row["distribution"][top])
        if row["abstained"]:
            assert row["abstain_reason"] in ("below_threshold", "out_of_taxonomy", "ambiguous")
            assert row["label"] is None
        else:
            assert row["abstain_reason"] is None and row["label"] == top


def test_annotations_record_their_provenance(service, labelled):
    """Each annotation names model, engine, prompt hash, taxonomy version and decoding settings."""
    job_id = labelled["job"]["job_id"]
    with service.client() as client:
        rows = sql(client, "SELECT DISTINCT model, engine, prompt_hash, taxonomy_version, decoding"
                           f" FROM annotations WHERE job_id = '{job_id}'")
    assert len(rows) == 1
    row = rows[0]
    assert row["model"] == "SmolLM2-135M-Instruct-Q4_1" and row["engine"] == "embedded-transformers"
    assert len(row["prompt_hash"]) == 12 and row["taxonomy_version"] == labelled["version"]
    assert json.loads(row["decoding"])["method"] == "continuation-logprob"


def test_rerun_is_served_from_the_cache(service, labelled):
    """The same documents with the same annotator keys are not recomputed and give identical labels."""
    first = labelled["job"]["job_id"]
    with service.client() as client:
        again = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": _documents()}).json()
        job = wait_for_job(client, again["job_id"])
        assert job["cached"] == 10 and job["done"] == 10
        rows = sql(client, "SELECT count(*) AS differing FROM labels a JOIN labels b USING (doc_id)"
                           f" WHERE a.job_id = '{first}' AND b.job_id = '{again['job_id']}'"
                           " AND (a.distribution != b.distribution OR a.candidates != b.candidates)")
        latency = sql(client, f"SELECT max(latency_ms) AS ms FROM annotations WHERE job_id = '{again['job_id']}'")
    assert rows == [{"differing": 0}]
    assert latency == [{"ms": 0.0}]


def test_labels_stream_as_jsonl_and_parquet(service, labelled):
    """GET /labels gives the same rows as JSONL and as Parquet, in input order."""
    job_id = labelled["job"]["job_id"]
    with service.client() as client:
        lines = client.get(f"/v1/jobs/{job_id}/labels").text.splitlines()
        parquet = client.get(f"/v1/jobs/{job_id}/labels", params={"format": "parquet"})
    records = [json.loads(line) for line in lines]
    assert [r["doc_id"] for r in records] == [d["id"] for d in _documents()]
    table = pq.read_table(io.BytesIO(parquet.content))
    assert table.num_rows == 10
    assert table.column("doc_id").to_pylist() == [r["doc_id"] for r in records]
    downloads = service.data_dir / "downloads"  # the Parquet file was built for this read, and unlinked once opened
    assert not any(downloads.iterdir())


def test_changed_taxonomy_is_a_new_version_and_old_jobs_keep_theirs(service, labelled):
    """Pushing an edited file makes a new version; the earlier job still points at the old one."""
    edited = TAXONOMY.read_text().replace("Short text messages (SMS)", "Short mobile text messages (SMS)")
    with service.client() as client:
        again = client.post("/v1/taxonomies", content=edited.encode())
        same = client.post("/v1/taxonomies", content=edited.encode())
        described = client.get("/v1/taxonomies/sms-spam").json()
        old_job = client.get(f"/v1/jobs/{labelled['job']['job_id']}").json()
    assert again.status_code == 201 and again.json()["version"] != labelled["version"]
    assert same.status_code == 201 and same.json() == {**again.json(), "created": False}
    assert described["version"] == again.json()["version"]
    assert {v["version"] for v in described["versions"]} >= {labelled["version"], again.json()["version"]}
    assert old_job["taxonomy_version"] == labelled["version"]


def test_server_side_source_file(service, labelled):
    """A job may name a CSV under the input dir instead of carrying documents."""
    source = service.input_dir / "small.csv"
    source.write_text("id,text,channel\na1,Call 09061234567 now to claim your FREE prize,sms\n"
                      "a2,I'll be home late tonight,sms\n")
    with service.client() as client:
        created = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "source": "small.csv"})
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["job_id"])
        meta = sql(client, f"SELECT doc_id, meta->>'channel' AS channel FROM labels WHERE job_id = '{job['job_id']}'"
                           " ORDER BY doc_id")
    assert job["done"] == 2
    assert meta == [{"doc_id": "a1", "channel": "sms"}, {"doc_id": "a2", "channel": "sms"}]


def test_cancel_a_finished_job_is_a_conflict(service, labelled):
    """DELETE on a finished job answers 409 and changes nothing."""
    with service.client() as client:
        response = client.delete(f"/v1/jobs/{labelled['job']['job_id']}")
    assert response.status_code == 409
    assert "already ended" in response.json()["error"]["message"]


def test_cli_push_submit_status_sql(service, labelled, tmp_path):
    """The CLI drives the same service: push, submit with progress, status and SQL."""
    pushed = service.cli("taxonomy", "push", str(TAXONOMY))
    assert "pushed sms-spam" in pushed.stdout
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in _documents()[:3]) + "\n")
    submitted = service.cli("submit", "--taxonomy", "sms-spam", str(corpus))
    job_id = submitted.stdout.split()[1].rstrip(":")
    assert "3/3" in submitted.stderr  # the progress bar's last state
    status = service.cli("status", job_id)
    assert "succeeded" in status.stdout
    answer = service.cli("sql", "--json", f"SELECT count(*) AS n FROM labels WHERE job_id = '{job_id}'")
    assert json.loads(answer.stdout)["rows"] == [[3]]


def test_strict_taxonomy_abstains_with_reasons(service):
    """With "none of these" allowed and a 0.999 threshold the model must abstain, each time with a reason."""
    strict = TAXONOMY.read_text().replace("name: sms-spam", "name: sms-strict") + (
        "abstention:\n  threshold: 0.999\n  allow_none: true\n")
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=strict.encode()).status_code in (200, 201)
        job_id = client.post("/v1/jobs", json={"taxonomy": "sms-strict", "documents": _documents()}).json()["job_id"]
        job = wait_for_job(client, job_id)
        rows = sql(client, "SELECT label, abstained, abstain_reason, candidates, distribution"
                           f" FROM labels WHERE job_id = '{job_id}'")
    assert job["abstained"] == sum(r["abstained"] for r in rows) > 0
    for row in rows:
        assert set(row["distribution"]) == {"ham", "spam", "none_of_these"}
        assert "none_of_these" not in row["candidates"] and row["candidates"]
        if row["abstained"]:
            assert row["label"] is None
            expected = "out_of_taxonomy" if max(row["distribution"], key=row["distribution"].get) == "none_of_these" \
                else "below_threshold"
            assert row["abstain_reason"] == expected


def test_multi_label_gives_each_label_its_own_probability(service):
    """A multi-label taxonomy: independent probabilities in [0, 1]; chosen labels are exactly those >= 0.5."""
    with service.client() as client:
        pushed = client.post("/v1/taxonomies", content=(FIXTURES / "message-topics.yaml").read_bytes())
        assert pushed.status_code in (200, 201), pushed.text
        job_id = client.post("/v1/jobs", json={"taxonomy": "message-topics", "documents": _documents()}).json()["job_id"]
        assert wait_for_job(client, job_id)["done"] == 10
        rows = sql(client, f"SELECT labels, label, distribution, abstained FROM labels WHERE job_id = '{job_id}'")
    assert len(rows) == 10
    for row in rows:
        assert set(row["distribution"]) == {"food", "money", "travel"}
        assert all(0.0 <= p <= 1.0 for p in row["distribution"].values())
        chosen = sorted((name for name, p in row["distribution"].items() if p >= 0.5),
                        key=lambda name: -row["distribution"][name])
        assert row["labels"] == chosen
        assert row["abstained"] == (not chosen) and row["label"] == (chosen[0] if chosen else None)


def test_openapi_is_published(service):
    """The public contract is published with the issue's paths."""
    with service.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/taxonomies", "/v1/taxonomies/{name}", "/v1/jobs", "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/labels", "/v1/sql"} <= set(paths)


def test_cli_lists_the_models_with_their_engines(service):
    """`annotate models list` shows every model of the models file, the default marked."""
    assert "smollm2" in service.cli("models", "list").stdout
    models = {m["name"]: m for m in json.loads(service.cli("models", "list", "--json").stdout)}
    assert set(models) == {"smollm2", "fake", "slow-fake", "llama", "faulty"}
    assert models["smollm2"]["engine"] == "embedded-transformers" and models["smollm2"]["default"]
    assert models["llama"]["engine"] == "openai" and models["llama"]["stats"]["queue_depth"] == 0
