"""The trustworthy-labels workflow end to end on the real service (Ray Serve, SmolLM2, MiniLM, DuckDB, HTTP).

Sixty TREC questions (tests/fixtures/questions.jsonl, with their human coarse labels) are
labelled by three annotators, two prompts on the embedded SmolLM2 and the embedding
annotator; a gold sample is drawn, exported as CSV, filled in from the fixture's human
labels and imported with the CLI; then the report, calibration, estimates and label issues
are read over HTTP and checked against SQL on the same data.
"""

from __future__ import annotations

import csv
import json

import pytest
from conftest import FIXTURES, REPO, sql, wait_for_job

QUESTIONS = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines() if line.strip()]
HUMAN = {q["id"]: q["coarse"] for q in QUESTIONS}


@pytest.fixture(scope="module")
def panel_job(service) -> str:
    """A finished three-annotator job on the TREC fixture, submitted with the CLI."""
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "trec-coarse.yaml").read_bytes()).is_success
    out = service.cli("submit", str(FIXTURES / "questions.jsonl"), "-t", "trec-coarse", "-a", "smollm2",
                      "-a", "terse=smollm2:classify_terse", "-a", "embedding", "--aggregation", "dawid_skene",
                      "--no-wait").stdout
    job_id = out.split()[1].rstrip(":")
    with service.client() as client:
        job = wait_for_job(client, job_id)
    assert job["status"] == "succeeded", job
    return job_id


def test_each_annotator_labels_every_question_and_the_votes_are_aggregated(service, panel_job):
    """Three annotators' rows, one aggregated label per question, progress 1, and re-aggregation by the CLI."""
    with service.client() as client:
        job = client.get(f"/v1/jobs/{panel_job}").json()
        assert [a["name"] for a in job["annotators"]] == ["smollm2/classify", "terse", "embedding"]
        assert all(a["done"] == len(QUESTIONS) for a in job["annotators"]) and job["progress"] == 1.0
        assert job["aggregation"] == "dawid_skene" and job["done"] + job["failed"] == len(QUESTIONS)
        per_annotator = sql(client, f"SELECT ja.name, count(*) AS n FROM annotations a JOIN job_annotators ja"
                                    f" USING (job_id, annotator) WHERE job_id = '{panel_job}' GROUP BY 1")
        assert sorted(r["n"] for r in per_annotator) == [len(QUESTIONS)] * 3
        assert len(sql(client, f"SELECT doc_id FROM labels WHERE job_id = '{panel_job}'")) == len(QUESTIONS)
        agreement = client.get(f"/v1/jobs/{panel_job}/agreement").json()
        assert len(agreement["pairs"]) == 3 and all(p["n"] > 0 for p in agreement["pairs"])
        service.cli("aggregate", panel_job, "calibrated_mean")
        assert client.get(f"/v1/jobs/{panel_job}").json()["aggregation"] == "calibrated_mean"
        assert len(sql(client, f"SELECT doc_id FROM labels WHERE job_id = '{panel_job}'")) == len(QUESTIONS)
        service.cli("aggregate", panel_job, "majority_vote")
        assert client.get(f"/v1/jobs/{panel_job}").json()["aggregation"] == "majority_vote"
        unanimous = sql(client, f"""
            SELECT l.doc_id, l.label, any_value(a.label) AS vote FROM labels l JOIN annotations a USING (job_id, doc_id)
            JOIN job_annotators USING (job_id, annotator) WHERE l.job_id = '{panel_job}' AND NOT a.abstained
            GROUP BY ALL HAVING count(DISTINCT a.label) = 1 AND count(*) = 3""")
        assert unanimous and all(r["label"] == r["vote"] for r in unanimous)


def test_gold_round_trip_report_calibration_estimates_and_issues(service, panel_job, tmp_path):
    """The whole gold workflow through the CLI and HTTP, each number checked against SQL on the gold view."""
    service.cli("gold", "sample", panel_job, "--size", "40", "--design", "stratified")
    exported = tmp_path / "gold.csv"
    service.cli("gold", "export", panel_job, str(exported))
    with exported.open() as opened:
        rows = list(csv.DictReader(opened))
    assert len(rows) == 40 and all(r["label"] == "" for r in rows)  # the person sees no LLM label
    for row in rows:
        row.update(label=HUMAN[row["doc_id"]], annotator="trec")
    with exported.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert "40 of 40" in service.cli("gold", "import", panel_job, str(exported)).stdout

    report = json.loads(service.cli("report", panel_job, "--json").stdout)
    with service.client() as client:
        expected = sql(client, f"SELECT sum(weight * (gold_label = llm_label)::INT) / sum(weight) AS acc FROM gold"
                               f" WHERE job_id = '{panel_job}' AND NOT abstained")[0]["acc"]
        assert report["n"] == 40 and report["accuracy"]["estimate"] == pytest.approx(expected)
        assert {a["name"] for a in report["annotators"]} == {"smollm2/classify", "terse", "embedding"}
        assert len(report["agreement"]["pairs"]) == 3
        kept = sql(client, f"SELECT value FROM quality_metrics WHERE job_id = '{panel_job}' AND metric = 'accuracy'")
        assert kept[0]["value"] == pytest.approx(expected)

        calibration = client.post(f"/v1/jobs/{panel_job}/calibrate", json={"alpha": 0.2}).json()
        sets = sql(client, f"SELECT conformal_candidates AS c FROM labels WHERE job_id = '{panel_job}'")
        assert 0 <= calibration["threshold"] <= 1 and all(isinstance(r["c"], list) for r in sets)

        shares = client.post(f"/v1/jobs/{panel_job}/estimate", json={"target": "proportions"}).json()
        assert {r["label"] for r in shares["estimates"]} == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
        hum = next(r for r in shares["estimates"] if r["label"] == "HUM")
        hajek = sql(client, f"SELECT sum(weight * (gold_label = 'HUM')::INT) / sum(weight) AS s FROM gold"
                            f" WHERE job_id = '{panel_job}'")[0]["s"]
        assert hum["gold_only"]["estimate"] == pytest.approx(hajek)
        assert hum["dsl"]["low"] <= hum["dsl"]["estimate"] <= hum["dsl"]["high"]

        bad = client.post(f"/v1/jobs/{panel_job}/estimate", json={"target": "regression"})
        assert bad.status_code == 422 and "outcome" in bad.json()["error"]["message"]

        for kind in ("gold", "llm"):
            issues = client.post(f"/v1/jobs/{panel_job}/label-issues", json={"kind": kind, "limit": 5}).json()
            assert issues["checked"] > 0 and len(issues["rows"]) <= 5
            suspicion = [r["suspicion"] for r in issues["rows"]]
            assert suspicion == sorted(suspicion, reverse=True)
            kept = client.get(f"/v1/jobs/{panel_job}/label-issues", params={"kind": kind, "limit": 5}).json()
            assert kept == issues  # the GET reads the stored ranking: same rows, same time of computation


def test_gold_endpoints_refuse_bad_input_with_clear_messages(service, panel_job):
    """Invalid JSON, an unknown label and a sample drawn twice get 4xx answers that say what to do."""
    with service.client() as client:
        client.post(f"/v1/jobs/{panel_job}/gold-sample", json={"size": 10, "replace": True})
        broken = client.post(f"/v1/jobs/{panel_job}/gold", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 422 and "invalid JSON at line 1" in broken.json()["error"]["message"]
        doc = client.get(f"/v1/jobs/{panel_job}/gold-sample").json()[0]["doc_id"]
        unknown = client.post(f"/v1/jobs/{panel_job}/gold", json={"annotator": "x", "labels": [{"doc_id": doc, "label": "FOOD"}]})
        assert unknown.status_code == 422 and "'FOOD'" in unknown.json()["error"]["message"]
        again = client.post(f"/v1/jobs/{panel_job}/gold-sample", json={"size": 10})
        assert again.status_code == 409 and "replace" in again.json()["error"]["message"]
        wrong = client.post(f"/v1/jobs/{panel_job}/gold-sample", json={"size": 10, "design": "cluster"})
        assert wrong.status_code == 422 and "design" in wrong.json()["error"]["message"]
