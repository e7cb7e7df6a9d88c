"""Students end to end on the real service: trained from a real labelled job, served over HTTP, in a cascade.

The 60 TREC fixture questions are labelled by the embedded SmolLM2; two kinds of student
(hashed n-grams and a MiniLM head) learn from those labels as Ray tasks, answer
``/predict`` in the LLM's label shape, export to a file scikit-learn loads on its own, and
label a cascade job that sends only their unsure documents to the LLM.
"""

from __future__ import annotations

import io
import json
import tarfile
import time

import joblib
import pytest
from conftest import FIXTURES, REPO, sql, wait_for_job

from service.errors import InvalidInput
from service.work.trainings import student_dir

QUESTIONS = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def labelled_job(service) -> str:
    """A finished single-LLM job over the TREC fixture."""
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "trec-coarse.yaml").read_bytes()).is_success
        created = client.post("/v1/jobs", json={"taxonomy": "trec-coarse", "documents": [
            {"id": q["id"], "text": q["text"]} for q in QUESTIONS]}).json()
        assert wait_for_job(client, created["job_id"])["status"] == "succeeded"
    return created["job_id"]


def _trained(client, job_id: str, kind: str) -> dict:
    """Train a student over HTTP and wait until it is ready."""
    started = client.post("/v1/classifiers", json={"jobs": [job_id], "kind": kind, "name": f"trec-{kind}"})
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 600
    while (row := client.get(f"/v1/classifiers/{started.json()['classifier_id']}").json())["status"] == "training":
        assert time.monotonic() < deadline, "training took over 10 minutes"
        time.sleep(1)
    assert row["status"] == "ready", row
    return row


@pytest.mark.parametrize("kind", ["ngram", "minilm"])
def test_students_train_from_a_job_and_predict_over_http(service, labelled_job, kind):
    """Metrics are recorded, /predict answers in the label shape, and the export loads without the service."""
    with service.client() as client:
        row = _trained(client, labelled_job, kind)
        report = row["report"]
        assert report["n_train"] + report["n_validation"] + report["n_test"] == len(QUESTIONS)
        assert 0 <= report["llm_holdout"]["accuracy"] <= 1 and report["cost"]["docs_per_s"] > 0
        texts = [q["text"] for q in QUESTIONS[:8]]
        labels = client.post(f"/v1/classifiers/{row['classifier_id']}/predict", json={"texts": texts}).json()["labels"]
        assert len(labels) == 8
        for label in labels:
            assert set(label) == {"label", "confidence", "candidates", "abstained", "abstain_reason", "distribution"}
            assert label["label"] == max(label["distribution"], key=label["distribution"].get)
            assert abs(sum(label["distribution"].values()) - 1) < 1e-6
        by_name = client.get(f"/v1/classifiers/trec-{kind}").json()
        assert by_name["classifier_id"] == row["classifier_id"]
        if kind == "ngram":  # a plain scikit-learn pipeline: loads and predicts with scikit-learn alone
            archive = client.get(f"/v1/classifiers/{row['classifier_id']}/export").content
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("model.joblib"))
                pipeline = joblib.load(tar.extractfile(member))
            exported = dict(zip(pipeline.classes_, pipeline.predict_proba(texts[:1])[0]))  # the classes it saw
            assert exported == pytest.approx({k: labels[0]["distribution"][k] for k in exported})
            assert all(p == 0.0 for k, p in labels[0]["distribution"].items() if k not in exported)


def test_cascade_sends_only_unsure_documents_to_the_llm(service, labelled_job, labelled_taxonomy):
    """The student labels every question; those under the threshold get the LLM's label, the rest keep the student's."""
    with service.client() as client:
        student = _trained(client, labelled_job, "ngram")
        created = client.post("/v1/jobs", json={"taxonomy": "trec-coarse", "classifier": student["classifier_id"],
                                                "cascade_threshold": 0.5,
                                                "documents": [{"id": q["id"], "text": q["text"]} for q in QUESTIONS]})
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["job_id"])
        assert job["status"] == "succeeded" and job["aggregation"] == "cascade"
        unsure = sql(client, f"""SELECT count(*) AS n FROM annotations a JOIN job_annotators ja USING (job_id, annotator)
                                 WHERE job_id = '{job['job_id']}' AND ja.kind = 'classifier'
                                 AND (a.abstained OR a.confidence < 0.5 OR a.status = 'failed')""")[0]["n"]
        assert job["routed"] == unsure and job["done"] + job["failed"] == len(QUESTIONS)
        mismatched = sql(client, f"""
            SELECT l.doc_id FROM labels l JOIN annotations a USING (job_id, doc_id) JOIN job_annotators ja
            USING (job_id, annotator) WHERE l.job_id = '{job['job_id']}'
            GROUP BY l.doc_id, l.label HAVING l.label IS DISTINCT FROM CASE
                WHEN count(*) FILTER (WHERE ja.kind = 'llm') > 0 THEN any_value(a.label) FILTER (WHERE ja.kind = 'llm')
                ELSE any_value(a.label) FILTER (WHERE ja.kind = 'classifier') END""")
        assert mismatched == []
        refused = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "classifier": student["classifier_id"],
                                                "documents": [{"text": "hi"}]})
        assert refused.status_code == 422 and "learnt trec-coarse" in refused.json()["error"]["message"]


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "..\\x", "a\u0000b", "a..b", "/etc", "-x", "x."])
def test_a_name_that_is_not_a_plain_directory_name_is_refused(in_process, name):
    """Names become DATA_DIR/classifiers/NAME: anything that could lead elsewhere is a 422 naming the field."""
    response = in_process.client.post("/v1/classifiers", json={"jobs": ["job_x"], "name": name})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("name:")


def test_a_plain_name_passes_and_the_path_is_checked_where_it_is_built(in_process, tmp_path):
    """A good name reaches the handler (the job is unknown: 404); ``student_dir`` refuses escapes on its own."""
    good = in_process.client.post("/v1/classifiers", json={"jobs": ["job_x"], "name": "trec-ngram.v2_b"})
    assert good.status_code == 404, good.text
    root = (tmp_path / "classifiers").resolve()
    assert student_dir(tmp_path, "trec-ngram") == root / "trec-ngram"
    for name in ("..", ".", "a/../..", "a/b", str(tmp_path), "a\x00b", ""):
        with pytest.raises(InvalidInput, match="^name: "):
            student_dir(tmp_path, name)
