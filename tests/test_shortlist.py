"""Large taxonomies: each document scored on a shortlist of its most plausible leaves.

End to end on the real service (embedded SmolLM2, the MiniLM retriever, DuckDB): the
50-leaf TREC taxonomy labelled with a shortlist of 5, the shortlist visible in SQL, the
distribution 0 outside it, the recall on the gold sample in the report; and a taxonomy too
large to score whole is refused with a message that says what to set. The retriever's
calibration of K is checked in-process on the same questions.
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import FIXTURES, REPO, sql, wait_for_job

from service.engines.embeddings import shared_embedder
from service.labelling.shortlist import Shortlister
from service.taxonomy import load_taxonomy, parse_taxonomy

QUESTIONS = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines() if line.strip()]
TREC = load_taxonomy(REPO / "taxonomy" / "trec-questions.yaml")
K = 5


@pytest.fixture(scope="module")
def shortlisted_job(service) -> str:
    """The 60 fixture questions labelled on the 50-leaf TREC taxonomy with a shortlist of 5; returns the job id."""
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "trec-questions.yaml").read_bytes()).is_success
        documents = [{"id": q["id"], "text": q["text"]} for q in QUESTIONS]
        response = client.post("/v1/jobs", json={"taxonomy": "trec-questions", "model": "smollm2",
                                                 "documents": documents, "shortlist": {"k": K}})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["job_id"])
    assert job["status"] == "succeeded" and job["done"] == len(QUESTIONS), job
    return job["job_id"]


def test_each_document_is_scored_on_its_shortlist(service, shortlisted_job):
    """SQL shows the K leaves scored per document; the label is one of them and every other leaf has probability 0."""
    with service.client() as client:
        rows = sql(client, "SELECT doc_id, label, abstained, abstain_reason, shortlist, distribution FROM labels"
                           f" WHERE job_id = '{shortlisted_job}'")
    leaves = set(TREC.label_names())
    assert len(rows) == len(QUESTIONS)
    assert len({tuple(r["shortlist"]) for r in rows}) > 1, "shortlists follow the documents"
    for row in rows:
        shortlist = row["shortlist"]
        assert len(shortlist) == K and set(shortlist) <= leaves
        assert shortlist == [name for name in TREC.label_names() if name in shortlist]  # taxonomy order
        assert set(row["distribution"]) == leaves
        assert all(p == 0.0 for name, p in row["distribution"].items() if name not in shortlist)
        assert sum(row["distribution"].values()) == pytest.approx(1.0)
        assert row["abstained"] or row["label"] in shortlist
        assert not row["abstained"] or row["abstain_reason"] in ("flat_shortlist", "below_threshold", "ambiguous")


def test_the_report_states_the_shortlist_recall(service, shortlisted_job):
    """With gold labels on a sample, the report gives the share of gold labels that were on the shortlist."""
    fine = {q["id"]: q["fine"] for q in QUESTIONS}
    with service.client() as client:
        assert client.post(f"/v1/jobs/{shortlisted_job}/gold-sample", json={"size": 30, "seed": 1}).is_success
        sample = client.get(f"/v1/jobs/{shortlisted_job}/gold-sample").json()
        labels = [{"doc_id": row["doc_id"], "label": fine[row["doc_id"]]} for row in sample]
        assert client.post(f"/v1/jobs/{shortlisted_job}/gold", json={"annotator": "ann", "labels": labels}).is_success
        report = client.post(f"/v1/jobs/{shortlisted_job}/report").json()
        shortlists = {r["doc_id"]: r["shortlist"] for r in sql(
            client, f"SELECT doc_id, shortlist FROM labels WHERE job_id = '{shortlisted_job}'")}
    recall = report["shortlist"]
    expected = sum(fine[row["doc_id"]] in shortlists[row["doc_id"]] for row in sample) / len(sample)
    assert recall["n"] == len(sample) and recall["k"] == K
    assert recall["recall"] == pytest.approx(expected)
    assert recall["interval"]["low"] <= recall["recall"] <= recall["interval"]["high"]


def test_a_taxonomy_too_large_to_score_whole_is_refused_with_what_to_set(service):
    """150 leaves and no shortlist: 422 naming the setting and the option; the same job with a shortlist runs. A
    shortlist longer than the setting, or the same labels multi-label (scored whole), is refused naming it too."""
    body = yaml.safe_load((REPO / "taxonomy" / "trec-questions.yaml").read_text())
    leaves = [label for label in body["labels"] if label.get("parent")]
    body["name"] = "trec-split"
    body["labels"] = [label for label in body["labels"] if not label.get("parent")] + [
        {**label, "name": f"{label['name']}/{i}", "description": f"{label['description']} (variant {i})"}
        for label in leaves for i in range(3)]
    assert len(parse_taxonomy(yaml.safe_dump(body)).leaves()) == 150
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=yaml.safe_dump(body).encode()).is_success
        documents = [{"id": q["id"], "text": q["text"]} for q in QUESTIONS[:3]]
        refused = client.post("/v1/jobs", json={"taxonomy": "trec-split", "documents": documents, "model": "smollm2"})
        accepted = client.post("/v1/jobs", json={"taxonomy": "trec-split", "documents": documents, "model": "smollm2",
                                                 "shortlist": {"k": "auto"}})
        long_list = client.post("/v1/jobs", json={"taxonomy": "trec-split", "documents": documents, "model": "smollm2",
                                                  "shortlist": {"k": 101}})
        multi = {**body, "name": "trec-multi", "multi_label": True}
        assert client.post("/v1/taxonomies", content=yaml.safe_dump(multi).encode()).is_success
        whole = client.post("/v1/jobs", json={"taxonomy": "trec-multi", "documents": documents, "model": "smollm2"})
        assert accepted.status_code == 202, accepted.text
        job = wait_for_job(client, accepted.json()["job_id"])
    assert refused.status_code == 422
    message = refused.json()["error"]["message"]
    assert "150 labels" in message and "ANNOTATE_MAX_SCORED_LABELS" in message and "shortlist" in message
    assert long_list.status_code == 422 and "shortlist k = 101" in long_list.json()["error"]["message"]
    assert whole.status_code == 422 and "multi-label taxonomies are scored whole" in whole.json()["error"]["message"]
    assert job["status"] == "succeeded" and job["done"] == 3


def test_auto_k_reaches_the_recall_on_labelled_texts():
    """With labelled texts, ``auto`` picks the smallest K whose leave-one-out recall reaches the target."""
    labelled = [(q["text"], q["fine"]) for q in QUESTIONS]
    shortlister = Shortlister(TREC, shared_embedder().embed, k="auto", recall=0.9, max_k=50, labelled=labelled)
    calibration = shortlister.calibration
    assert calibration.source == "gold" and calibration.n == len(QUESTIONS)
    assert calibration.recall >= 0.9 and calibration.interval[0] <= calibration.recall <= calibration.interval[1]
    smaller = Shortlister(TREC, shared_embedder().embed, k=calibration.k - 1, recall=0.9, max_k=50, labelled=labelled)
    held_out = smaller._scores(smaller._neighbours, skip=list(range(len(labelled))))
    truth = [TREC.label_names().index(label) for _, label in labelled]
    hits = sum((held_out[i] > held_out[i, t]).sum() < calibration.k - 1 for i, t in enumerate(truth))
    assert hits / len(labelled) < 0.9, "K - 1 would not have reached the recall"
    assert all(len(s) == calibration.k for s in shortlister.shortlists([q["text"] for q in QUESTIONS[:5]]))


def test_top_down_shortlists_are_whole_families_of_the_chosen_parents(service):
    """``top_down``: the LLM picks among the 6 parents, and each shortlist is every child of the parents it kept."""
    children = {}
    for label in TREC.labels:
        if label.parent:
            children.setdefault(label.parent, set()).add(label.name)
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "trec-questions.yaml").read_bytes()).is_success
        documents = [{"id": q["id"], "text": q["text"]} for q in QUESTIONS[:6]]
        response = client.post("/v1/jobs", json={"taxonomy": "trec-questions", "model": "smollm2", "documents": documents,
                                                 "shortlist": {"strategy": "top_down"}})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["job_id"])
        rows = sql(client, f"SELECT shortlist, label FROM labels WHERE job_id = '{job['job_id']}'")
    assert job["status"] == "succeeded" and len(rows) == 6
    for row in rows:
        families = [parent for parent, names in children.items() if names & set(row["shortlist"])]
        assert set(row["shortlist"]) == set().union(*(children[p] for p in families))
        assert row["label"] is None or row["label"] in row["shortlist"]
