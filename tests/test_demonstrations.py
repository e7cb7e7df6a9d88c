"""Few-shot demonstrations chosen per document (taxonomy ``demonstrations``, service.labelling.demonstrations).

The selection rules run on the real MiniLM embedder; the end-to-end test labels TREC
questions on the real service (Ray Serve, the embedded SmolLM2 with ``classify_fewshot``,
DuckDB, HTTP) after people labelled an earlier job of the taxonomy: their labels relabel
that job (aggregation 'refined') and become the next job's demonstrations.
"""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, REPO, sql, wait_for_job

from service.engines.embeddings import shared_embedder
from service.labelling.demonstrations import Demonstrator
from service.taxonomy import Demonstrations, load_taxonomy

POOL = [("spam", "WINNER! Claim your free prize now, call 0906"), ("ham", "are we still on for lunch tomorrow?"),
        ("spam", "Free ringtones every week, text TONES to 81234"), ("ham", "running late, save me a seat"),
        ("spam", "URGENT: your mobile number won a 2000 GBP cash award"), ("ham", "can you pick up milk on the way")]
PANEL = {"annotators": [{"kind": "llm"}, {"kind": "embedding"}], "aggregation": "refined"}  # the default panel
# (the suite's service pins ANNOTATE_DEFAULT_ANNOTATORS=llm)
QUESTIONS = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines() if line.strip()]


def _demonstrator(**plan) -> Demonstrator:
    """A demonstrator over POOL with the real embedder."""
    return Demonstrator(POOL, Demonstrations(**plan), shared_embedder().embed_documents)


def test_similar_puts_the_nearest_last_and_never_shows_a_document_itself():
    """k = 2 'similar': two prize messages for a prize message, the nearest next to it; a pool text is not its own."""
    demonstrator = _demonstrator(select="similar", k=2)
    [chosen] = demonstrator.choose(["Congratulations, you won a cash prize! Call now to claim"])
    assert [label for label, _ in chosen] == ["spam", "spam"]
    [again] = demonstrator.choose([POOL[0][1]])
    assert POOL[0] not in again and len(again) == 2


def test_label_diverse_shows_every_label_and_the_budget_cuts_each_demonstration():
    """label_diverse with k = 2 shows one spam and one ham; max_chars 100 leaves each demonstration 50 characters."""
    [chosen] = _demonstrator(select="label_diverse", k=2, max_chars=100).choose(["free prize, text WIN now"])
    assert sorted(label for label, _ in chosen) == ["ham", "spam"]
    assert all(len(text) <= 50 for _, text in chosen)


def test_mmr_trades_similarity_for_variety():
    """MMR's second pick is not the near-duplicate of its first when a less similar, different text exists."""
    pool = [("spam", "win a free prize now"), ("spam", "win a free prize now!"), ("spam", "cheap loans, reply YES")]
    mmr = Demonstrator(pool, Demonstrations(select="mmr", k=2), shared_embedder().embed_documents)
    similar = Demonstrator(pool, Demonstrations(select="similar", k=2), shared_embedder().embed_documents)
    query = ["win a free prize today"]
    assert {text for _, text in similar.choose(query)[0]} == {pool[0][1], pool[1][1]}
    assert pool[2][1] in {text for _, text in mmr.choose(query)[0]}


@pytest.mark.parametrize("setting", ["multi_label: true", "shortlist: {k: 2}"])
def test_a_taxonomy_with_demonstrations_must_be_single_label_and_scored_whole(setting):
    """Pushing demonstrations with a multi-label or shortlisted taxonomy is refused, naming the field."""
    from service.taxonomy import TaxonomyError, parse_taxonomy

    text = (REPO / "taxonomy" / "sms-spam.yaml").read_text() + f"\n{setting}\ndemonstrations: {{k: 2}}\n"
    with pytest.raises(TaxonomyError) as info:
        parse_taxonomy(text)
    assert "demonstrations" in str(info.value)


@pytest.fixture(scope="module")
def demonstrated_taxonomy(service) -> str:
    """TREC coarse with 'demonstrations: {k: 3}', pushed as 'trec-demos'."""
    text = (REPO / "taxonomy" / "trec-coarse.yaml").read_text().replace("name: trec-coarse", "name: trec-demos", 1)
    with service.client() as client:
        pushed = client.post("/v1/taxonomies", content=(text + "\ndemonstrations:\n  k: 3\n").encode())
    assert pushed.status_code in (200, 201), pushed.text
    return "trec-demos"


def test_people_s_labels_relabel_their_job_and_demonstrate_for_the_next(service, demonstrated_taxonomy):
    """Twelve questions labelled by people relabel their own default job ('refined', cross-fitted on them) and
    are the pool (with the taxonomy's examples) of the next job's classify_fewshot, which labels its six
    questions through the real engine; a chat prompt is refused."""
    first, second = QUESTIONS[:12], QUESTIONS[12:18]
    with service.client() as client:
        job_id = client.post("/v1/jobs", json={"taxonomy": demonstrated_taxonomy, **PANEL, "documents": [
            {"id": q["id"], "text": q["text"]} for q in first]}).json()["job_id"]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        assert client.post(f"/v1/jobs/{job_id}/gold-sample", json={"size": len(first)}).status_code == 201
        assert client.post(f"/v1/jobs/{job_id}/gold", json={"annotator": "ann", "labels": [
            {"doc_id": q["id"], "label": q["coarse"]} for q in first]}).is_success
        relabelled = client.post(f"/v1/jobs/{job_id}/aggregate", json={"method": "refined"}).json()
        assert relabelled["refinement"]["trained_on"] == "gold labels"
        assert relabelled["refinement"]["gold_labels"] == len(first)
        assert relabelled["refinement"]["read_by_llm"] is True  # the embedded model read the texts, through Serve
        assert client.get(f"/v1/jobs/{job_id}/report").json()["refinement"] == relabelled["refinement"]
        answer = client.post("/v1/jobs", json={"taxonomy": demonstrated_taxonomy, **PANEL, "documents": [
            {"id": q["id"], "text": q["text"]} for q in second]})
        assert answer.status_code == 202, answer.text
        job = wait_for_job(client, answer.json()["job_id"])
        assert job["status"] == "succeeded" and job["done"] == len(second)
        [row] = sql(client, f"SELECT annotator_spec FROM jobs WHERE job_id = '{job['job_id']}'")
        llm = json.loads(row["annotator_spec"])["members"][0]
        examples = sum(len(label.examples) for label in load_taxonomy(REPO / "taxonomy" / "trec-coarse.yaml").labels)
        assert llm["prompt"] == "classify_fewshot" and llm["demonstrations"]["pool"] == examples + len(first)
        refused = client.post("/v1/jobs", json={"taxonomy": demonstrated_taxonomy, "documents": [{"text": "x?"}],
                                                "annotators": [{"kind": "llm", "prompt": "classify"}]})
        assert refused.status_code == 422 and "classify_fewshot" in refused.text
        batch = client.post("/v1/jobs", json={"taxonomy": demonstrated_taxonomy, "mode": "batch",
                                              "source": "questions.jsonl"})
        assert batch.status_code == 422 and "demonstrations" in batch.text and "stream" in batch.text
