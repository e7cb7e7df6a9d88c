"""A stream job that names no annotators gets the LLM and the embedding annotator, aggregated by calibrated_mean.

The real app and store in-process with the real embedding annotator (MiniLM); the LLM is the
FakeEngine of the ``in_process`` fixture, since only the panel's make-up and its aggregation
are under test here (the embedded model's labels are measured in benchmarks/zero_shot.py).
"""

from __future__ import annotations

import pytest
from conftest import REPO, wait_for_job

DOCS = [{"id": f"m{i}", "text": text} for i, text in enumerate([
    "WINNER!! You have won a 1000 GBP prize, call 09061701461 now to claim", "see you at dinner tonight mum",
    "FREE ringtones every week, txt TONES to 81234", "running late, save me a seat pls"])]


def _finished(client, job_id: str) -> dict:
    """The job once it has ended."""
    return wait_for_job(client, job_id, timeout_s=120)


def test_a_job_without_annotators_gets_the_default_panel(in_process):
    """Two annotators (the LLM, the embedding annotator), calibrated_mean, and one aggregated label per document."""
    client = in_process.client
    answer = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": DOCS})
    assert answer.status_code == 202, answer.text
    job = _finished(client, answer.json()["job_id"])
    assert job["status"] == "succeeded" and job["aggregation"] == "calibrated_mean"
    assert [a["kind"] for a in job["annotators"]] == ["llm", "embedding"]
    assert all(a["done"] == len(DOCS) for a in job["annotators"])
    labels = client.get(f"/v1/jobs/{job['job_id']}/labels").text.strip().splitlines()
    assert len(labels) == len(DOCS)


def test_a_chosen_aggregation_and_the_single_llm_setting_are_kept(in_process):
    """A job's own 'aggregation' wins; ANNOTATE_DEFAULT_ANNOTATORS=llm gives the one LLM annotator."""
    client = in_process.client
    job_id = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": DOCS,
                                           "aggregation": "majority_vote"}).json()["job_id"]
    assert _finished(client, job_id)["aggregation"] == "majority_vote"
    in_process.settings.default_annotators = "llm"
    job = _finished(client, client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": DOCS}).json()["job_id"])
    assert [a["kind"] for a in job["annotators"]] == ["llm"]


@pytest.mark.parametrize("setting", ["multi_label: true", "abstention: {allow_none: true}"])
def test_multi_label_and_none_of_these_taxonomies_keep_the_llm_alone(in_process, setting):
    """The embedding annotator labels single-label taxonomies and never says "none of these": the LLM labels alone."""
    client = in_process.client
    text = (REPO / "taxonomy" / "sms-spam.yaml").read_text().replace("name: sms-spam", "name: sms-other", 1)
    pushed = client.post("/v1/taxonomies", content=(text + f"\n{setting}\n").encode())
    assert pushed.status_code == 201, pushed.text
    answer = client.post("/v1/jobs", json={"taxonomy": "sms-other", "documents": DOCS})
    assert answer.status_code == 202, answer.text
    assert [a["kind"] for a in _finished(client, answer.json()["job_id"])["annotators"]] == ["llm"]
