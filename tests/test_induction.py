"""Taxonomy induction end to end: a real corpus in, a valid taxonomy out, then used for labelling.

The corpus is 60 real TREC questions (tests/fixtures/questions.jsonl, 12 from each of 5
coarse classes). The main test runs the real embedded model and real embeddings through
the service; the evolution and CLI tests name the ``fake`` model (word overlap) where
the model's answers do not matter, to keep the suite short, and say so.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml
from conftest import FIXTURES, REPO, wait_for_job

from service.induction.diff import diff
from service.induction.inducer import sample_texts
from service.taxonomy import load_taxonomy, parse_taxonomy

QUESTIONS = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines()]


def _wait_induction(client, induction_id: str, timeout_s: float = 600) -> dict:
    """Poll an induction until it ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(f"/v1/inductions/{induction_id}").json()
        if state["status"] in ("succeeded", "failed"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"induction {induction_id} did not finish: {state}")


def test_induce_push_and_label_the_corpus(service):
    """Induce from the corpus with the embedded model, push the result, label the same corpus with it."""
    with service.client() as client:
        started = client.post("/v1/taxonomies:induce", json={
            "name": "questions-induced", "documents": [q["text"] for q in QUESTIONS], "max_labels": 5,
            "report_size": 20, "push": True})
        assert started.status_code == 202, started.text
        state = _wait_induction(client, started.json()["induction_id"])
        assert state["status"] == "succeeded", state
        job = client.post("/v1/jobs", json={"taxonomy": "questions-induced", "documents": [
            {"id": q["id"], "text": q["text"]} for q in QUESTIONS]}).json()
        finished = wait_for_job(client, job["job_id"])
    taxonomy = parse_taxonomy(state["yaml"])
    header = [line for line in state["yaml"].splitlines() if line.startswith("#")]
    assert any("SmolLM2" in line and "all-MiniLM-L6-v2" in line for line in header)
    assert any("corpus: 60 documents" in line for line in header)
    assert 2 <= len(taxonomy.labels) <= 5
    texts = {" ".join(q["text"].split()) for q in QUESTIONS}
    assert all(2 <= len(label.examples) <= 3 and set(label.examples) <= texts for label in taxonomy.labels)
    report = state["report"]
    assert set(report["labelled_shares"]) == set(taxonomy.label_names())
    assert abs(sum(report["sample_shares"].values()) - 1) < 1e-3 and 0 <= report["outlier_share"] <= 1
    assert 0 <= report["coverage"] <= 1 and report["report_size"] == 20
    assert (finished["status"], finished["done"] + finished["failed"]) == ("succeeded", 60)
    assert finished["failed"] == 0


def test_reinduction_extends_an_existing_taxonomy(service, labelled_taxonomy):
    """With a base, its labels are kept first and new groups come back as proposed additions.

    Uses the fake model: what is checked is the evolution mechanics, not the names.
    """
    with service.client() as client:
        started = client.post("/v1/taxonomies:induce", json={
            "name": "sms-plus", "base": "sms-spam", "model": "fake", "max_labels": 3, "report_size": 10,
            "documents": [q["text"] for q in QUESTIONS]}).json()
        state = _wait_induction(client, started["induction_id"])
    assert state["status"] == "succeeded", state
    taxonomy = parse_taxonomy(state["yaml"])
    assert taxonomy.label_names()[:2] == ["ham", "spam"]
    assert state["report"]["proposed_additions"] == taxonomy.label_names()[2:]
    assert "# proposed additions:" in state["yaml"]


def test_induction_errors_are_clear(service):
    """An unknown base is 404 and a request with no input is 422; a failed run says why."""
    with service.client() as client:
        unknown = client.post("/v1/taxonomies:induce", json={"name": "x", "base": "nope", "documents": ["a", "b"]})
        empty = client.post("/v1/taxonomies:induce", json={"name": "x"})
        blank = client.post("/v1/taxonomies:induce", json={"name": "x", "model": "fake", "documents": [" ", ""]})
        failed = _wait_induction(client, blank.json()["induction_id"])
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]
    assert empty.status_code == 422
    assert failed["status"] == "failed" and "at least 2 non-empty documents" in failed["error"]


def test_cli_induces_and_diffs(service, tmp_path):
    """`annotate taxonomy induce` writes a valid file; `taxonomy diff` shows what an edit changed.

    Uses the fake model (from the service's models file) for speed; embeddings are real.
    """
    out = tmp_path / "questions.yaml"
    service.cli("taxonomy", "induce", str(FIXTURES / "questions.jsonl"), "--out", str(out), "-k", "4",
                "--report-size", "10", "--model", "fake")
    induced = load_taxonomy(out)
    assert induced.name == "questions" and 2 <= len(induced.labels) <= 4
    edited = yaml.safe_load(out.read_text())
    edited["labels"][0]["description"] = "Edited by a person."
    removed = edited["labels"].pop()
    changed = tmp_path / "edited.yaml"
    changed.write_text(yaml.safe_dump(edited, sort_keys=False))
    lines = service.cli("taxonomy", "diff", str(out), str(changed)).stdout.splitlines()
    assert f"- {removed['name']}: {removed['description']}" in lines
    assert any(line.startswith(f"~ {edited['labels'][0]['name']}.description:") for line in lines)


def test_diff_of_the_shipped_trec_taxonomies():
    """The coarse and the two-level TREC taxonomies differ by the fine leaves and the parents."""
    lines = diff(load_taxonomy(REPO / "taxonomy" / "trec-coarse.yaml"), load_taxonomy(REPO / "taxonomy" /
                                                                                     "trec-questions.yaml"))
    assert any(line.startswith("+ ") for line in lines)
    assert diff(load_taxonomy(REPO / "taxonomy" / "sms-spam.yaml"), load_taxonomy(REPO / "taxonomy" /
                                                                                 "sms-spam.yaml")) == []


@pytest.mark.parametrize("size", [5, 50])
def test_reservoir_sample_is_uniform_and_counts_the_stream(size):
    """Every position is about equally likely to be sampled; the stream length is counted."""
    hits = [0] * 100
    for seed in range(2000):
        sample, count = sample_texts(({"text": str(i)} for i in range(100)), size, seed)
        assert count == 100 and len(sample) == size and len(set(sample)) == size
        for text in sample:
            hits[int(text)] += 1
    expected = 2000 * size / 100
    assert min(hits) > 0.6 * expected and max(hits) < 1.4 * expected


def test_llm_method_runs_the_tnt_llm_loop_on_a_server_model(service):
    """method 'llm' has the model rewrite the label list per mini-batch (JSON schema with arrays).

    Runs on the real llama.cpp server (model 'llama'); the embedded engine refuses it clearly.
    """
    documents = [q["text"] for q in QUESTIONS[:20]]
    with service.client() as client:
        served = client.post("/v1/taxonomies:induce", json={
            "name": "questions-llm", "method": "llm", "model": "llama", "max_labels": 3, "report_size": 5,
            "documents": documents}).json()
        embedded = client.post("/v1/taxonomies:induce", json={
            "name": "questions-llm", "method": "llm", "max_labels": 3, "report_size": 5,
            "documents": documents}).json()
        served_state = _wait_induction(client, served["induction_id"])
        embedded_state = _wait_induction(client, embedded["induction_id"])
    assert served_state["status"] == "succeeded", served_state["error"]
    taxonomy = parse_taxonomy(served_state["yaml"])
    assert 1 <= len(taxonomy.labels) <= 3 and "method: llm" in served_state["yaml"]
    assert embedded_state["status"] == "failed" and "needs a model that writes JSON lists" in embedded_state["error"]
