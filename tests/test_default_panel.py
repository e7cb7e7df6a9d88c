"""A stream job that names no annotators gets the LLM and the embedding annotator, aggregated by 'refined';
gold labels relabel it.

The real app and store in-process with the real embedding annotator (MiniLM); the LLM is the
FakeEngine of the ``in_process`` fixture, since only the panel's make-up, its aggregation and
the relabelling loop are under test here (the embedded model's labels are measured in
benchmarks/zero_shot.py).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import FIXTURES, REPO, wait_for_job

from service.work.jobs import batch_calibrated

DOCS = [{"id": f"m{i}", "text": text} for i, text in enumerate([
    "WINNER!! You have won a 1000 GBP prize, call 09061701461 now to claim", "see you at dinner tonight mum",
    "FREE ringtones every week, txt TONES to 81234", "running late, save me a seat pls"])]


def _finished(client, job_id: str) -> dict:
    """The job once it has ended."""
    return wait_for_job(client, job_id, timeout_s=120)


def test_a_job_without_annotators_gets_the_default_panel(in_process):
    """Two annotators (the LLM, the embedding annotator), 'refined', and one aggregated label per document.

    Four documents are too few to fit anything: the refinement says so and leaves calibrated_mean's labels.
    """
    client = in_process.client
    answer = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": DOCS})
    assert answer.status_code == 202, answer.text
    job = _finished(client, answer.json()["job_id"])
    assert job["status"] == "succeeded" and job["aggregation"] == "refined"
    assert job["refinement"]["trained_on"] == "nothing"
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


def test_gold_labels_relabel_a_default_job_cross_fitted(in_process, monkeypatch):
    """60 real TREC questions: labelled without gold (the regression learns the panel's labels), then 40 gold
    labels and POST .../aggregate relabel the job with them, reading no text again; the report says how, and every
    gold document's label is the cross-fitted one (the refinement's cross-fitted gold accuracy is the labels' on
    those documents)."""
    client = in_process.client
    embedder, embedded = in_process.runner.panels.embedder(), []
    embed = embedder.embed_documents
    monkeypatch.setattr(embedder, "embed_documents", lambda texts: embedded.extend(texts) or embed(texts))
    questions = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines() if line.strip()]
    assert client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "trec-coarse.yaml").read_bytes()).is_success
    answer = client.post("/v1/jobs", json={"taxonomy": "trec-coarse",
                                           "documents": [{"id": q["id"], "text": q["text"]} for q in questions]})
    job = _finished(client, answer.json()["job_id"])
    assert job["status"] == "succeeded" and job["aggregation"] == "refined"
    assert job["refinement"]["trained_on"] == "panel labels" and job["refinement"]["gold_labels"] == 0
    # the embedding annotator's vectors are the refinement's: each question embedded once (service.work.kept_vectors)
    assert all(embedded.count(q["text"]) == 1 for q in questions)
    assert job["refinement"]["read_by_llm"] is False  # the fake engine cannot read: the encoder's vectors alone
    job_id = job["job_id"]
    drawn = client.post(f"/v1/jobs/{job_id}/gold-sample", json={"size": 40})
    assert drawn.status_code == 201, drawn.text
    truth = {q["id"]: q["coarse"] for q in questions}
    sample = client.get(f"/v1/jobs/{job_id}/gold-sample").json()
    put = client.post(f"/v1/jobs/{job_id}/gold", json={"annotator": "ann", "labels": [
        {"doc_id": row["doc_id"], "label": truth[row["doc_id"]]} for row in sample]})
    assert put.is_success, put.text
    read_before = len(embedded)
    relabelled = client.post(f"/v1/jobs/{job_id}/aggregate", json={"method": "refined"})
    assert relabelled.status_code == 200, relabelled.text
    assert len(embedded) == read_before  # the job's texts were read when it finished (service.work.kept_vectors)
    refinement = relabelled.json()["refinement"]
    assert refinement["trained_on"] == "gold labels" and refinement["gold_labels"] == 40
    assert "cross-fitted" in refinement["validity"]
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    assert report["refinement"] == refinement
    labels = {json.loads(line)["doc_id"]: json.loads(line) for line in
              client.get(f"/v1/jobs/{job_id}/labels").text.strip().splitlines()}
    hits = [labels[row["doc_id"]]["label"] == truth[row["doc_id"]] for row in sample]
    assert sum(hits) / len(hits) == pytest.approx(refinement["gold_accuracy"]["refined"])


def test_the_refinement_reads_each_document_in_the_job_s_own_prompt(in_process, monkeypatch, caplog):
    """A job whose model can read is refined on its reading of each document in the prompt the job labels with (its
    tuned one), recorded as ``read_by_llm``, and relabelling reads nothing again; once the service's settings no
    longer build that prompt, a text not yet read gets no reading (the encoder reads alone), with a warning. The
    model's reader is a stand-in that records the prompts it is given (the fake engine cannot read; the embedded
    model's reading through Serve is tests/test_demonstrations.py's): what is under test is which prompts the
    service asks it to read, and which of its views reach the refinement: an LLM the chance test silenced gives its
    reading over the text, not its state at the answer."""
    client, panels = in_process.client, in_process.runner.panels
    seen: list = []

    def read(requests: list) -> np.ndarray:
        seen.extend(requests)
        return np.random.default_rng(len(seen)).normal(size=(len(requests), 2, 8))

    monkeypatch.setitem(panels.models, "fake", replace(panels.models["fake"], reader=read))
    questions = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines() if line.strip()]
    assert client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "trec-coarse.yaml").read_bytes()).is_success
    answer = client.post("/v1/jobs", json={"taxonomy": "trec-coarse",
                                           "documents": [{"id": q["id"], "text": q["text"]} for q in questions]})
    job = _finished(client, answer.json()["job_id"])
    assert job["refinement"]["read_by_llm"] is True and job["refinement"]["trained_on"] == "panel labels"
    labeller = panels.labeller("trec-coarse", job["taxonomy_version"], "fake")  # the tuned prompt, as the job's LLM
    assert in_process.store.jobs.get(job["job_id"]).annotators[0].annotator == labeller.key
    assert sorted(seen, key=lambda r: r.user) == sorted((labeller.reading_request(q["text"]) for q in questions),
                                                        key=lambda r: r.user)
    relabelled = client.post(f"/v1/jobs/{job['job_id']}/aggregate", json={"method": "refined"})
    assert relabelled.status_code == 200 and relabelled.json()["refinement"]["read_by_llm"] is True
    assert len(seen) == len(questions)  # kept (service.work.kept_vectors)
    stored = in_process.store.jobs.get(job["job_id"])
    assert job["annotators"][0]["weight"] == 0.0  # silenced by the chance test (the test below)
    assert panels.reader(stored)([questions[0]["text"]]).shape == (1, 1, 8)  # so its reading over the text only
    voting = replace(stored, annotators=[replace(stored.annotators[0], weight=None), *stored.annotators[1:]])
    assert panels.reader(voting)([questions[0]["text"]]).shape == (1, 2, 8)  # a voting LLM's at its answer too
    assert len(seen) == len(questions)
    panels.max_scored_labels = 2  # the job's prompt cannot be built now (6 labels): the encoder alone reads new texts
    assert panels.reader(in_process.store.jobs.get(job["job_id"]))(["What is a new question?"]) is None
    assert "cannot be built" in caplog.text


def test_a_default_job_on_an_untuned_taxonomy_tunes_its_prompt_first(in_process):
    """The first default job tunes the prompt on its own documents (stored for the taxonomy version and model) and
    labels with the choice; the next job reuses it; with ANNOTATE_AUTO_TUNE off, or fewer than 20 documents,
    nothing is tuned."""
    client, store = in_process.client, in_process.store
    documents = [{"id": f"t{i}", "text": d["text"]} for i, d in enumerate(DOCS * 5)]  # 20: enough to tune on
    in_process.settings.auto_tune = False
    job = _finished(client, client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents}).json()["job_id"])
    version = job["taxonomy_version"]
    assert store.taxonomies.tuned_prompt("sms-spam", version, "fake") is None
    untuned = store.jobs.get(job["job_id"])
    assert batch_calibrated(untuned) == {untuned.annotators[0].annotator}  # its LLM is batch-calibrated
    in_process.settings.auto_tune = True
    job = _finished(client, client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents}).json()["job_id"])
    tuning = store.taxonomies.tunings("sms-spam", version)
    assert len(tuning) == 1 and tuning[0]["criterion"] == "embedding_agreement"
    voted = tuning[0]["evidence"]["informative"]  # an LLM no better than chance is not scored (test below)
    assert job["status"] == "succeeded" and [a["done"] for a in job["annotators"]] == [len(documents) * voted,
                                                                                     len(documents)]
    spec = store.jobs.get(job["job_id"]).annotator_spec
    assert "auto_tune" not in spec and spec["members"][0]["prompt"] == tuning[0]["prompt"]
    assert spec["members"][0]["tuning"]["calibration"] == tuning[0]["calibration"]
    assert batch_calibrated(store.jobs.get(job["job_id"])) == frozenset()  # the tuning chose its calibration
    assert job["annotators"][0]["name"] == f"fake/{tuning[0]['prompt']}"
    again = _finished(client, client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents}).json()["job_id"])
    assert store.taxonomies.tunings("sms-spam", version) == tuning and again["status"] == "succeeded"
    text = (REPO / "taxonomy" / "sms-spam.yaml").read_text().replace("name: sms-spam", "name: sms-few", 1)
    few_version = client.post("/v1/taxonomies", content=text.encode()).json()["version"]
    few = _finished(client, client.post("/v1/jobs", json={"taxonomy": "sms-few", "documents": DOCS}).json()["job_id"])
    assert few["status"] == "succeeded" and store.taxonomies.tuned_prompt("sms-few", few_version, "fake") is None  # 4 < 20


def test_an_llm_that_follows_the_embedding_annotator_no_more_than_chance_is_weighed_0(in_process):
    """The fake LLM scores label names by word overlap, and no TREC question names its answer type: every prompt
    gives every question the same distribution, which follows the embedding annotator's no better than any shuffle
    of it. The job's
    tuning records that (informative: false); its panel weighs the LLM 0 and says why, does not score it (its labels
    could not count), and its labels are the embedding annotator's, re-aggregated by another method too; a default
    job with its own aggregation does not score it either, and a job that lists the LLM scores it."""
    from service.labelling.tuning import CHANCE_ALPHA

    client, store = in_process.client, in_process.store
    questions = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines() if line.strip()]
    documents = [{"id": q["id"], "text": q["text"]} for q in questions]
    assert client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "trec-coarse.yaml").read_bytes()).is_success
    job = _finished(client, client.post("/v1/jobs", json={"taxonomy": "trec-coarse", "documents": documents}
                                        ).json()["job_id"])
    [tuning] = store.taxonomies.tunings("trec-coarse", job["taxonomy_version"])
    assert tuning["evidence"]["informative"] is False and tuning["evidence"]["chance_p_value"] >= CHANCE_ALPHA
    llm, embedding = job["annotators"]
    assert (llm["weight"], embedding["weight"]) == (0.0, None) and (llm["done"], embedding["done"]) == (0, len(documents))
    assert "no more than chance" in llm["weight_reason"] and embedding["weight_reason"] is None
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    voted = client.post(f"/v1/jobs/{job['job_id']}/aggregate", json={"method": "majority_vote"})
    assert voted.status_code == 200, voted.text
    labels = {json.loads(line)["doc_id"]: json.loads(line)["label"]
              for line in client.get(f"/v1/jobs/{job['job_id']}/labels").text.strip().splitlines()}
    assert labels == {row["doc_id"]: row["label"] for row in store.annotations.member_rows(job["job_id"])
                      if row["annotator"] == embedding["annotator"]}
    assert client.get(f"/v1/jobs/{job['job_id']}").json()["progress"] == 1.0
    own = _finished(client, client.post("/v1/jobs", json={"taxonomy": "trec-coarse", "documents": documents,
                                                          "aggregation": "dawid_skene"}).json()["job_id"])
    assert own["aggregation"] == "dawid_skene" and [a["done"] for a in own["annotators"]] == [0, len(documents)]
    listed = _finished(client, client.post("/v1/jobs", json={
        "taxonomy": "trec-coarse", "documents": documents, "annotators": [{"kind": "llm"}, {"kind": "embedding"}]}
        ).json()["job_id"])
    assert listed["annotators"][0]["weight"] is None and listed["annotators"][0]["done"] == len(documents)
