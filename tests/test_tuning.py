"""Prompt tuning (service.labelling.tuning): every candidate prompt measured on a sample, the choice stored and used by jobs.

The service tests run the real service (Ray Serve, the embedded SmolLM2 and MiniLM, DuckDB)
on a copy of the SMS taxonomy under another name, so the other tests' jobs on ``sms-spam``
keep the default prompt. The rule itself (agreement without gold, cross-fitted accuracy
with it) is tested on hand-made numbers, where the right answer is known.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import FIXTURES, REPO, sql, wait_for_job

from service.labelling.tuning import (
    AGREEMENT,
    CHANCE_ALPHA,
    GOLD,
    MIN_GOLD,
    PERMUTATIONS,
    CandidateResult,
    chance_p_value,
    choose,
    distributions,
    mutual_information,
    one_hot,
)

SPAM = ["WINNER! Claim your 500 GBP prize now, call 09061701461. T&Cs apply",
        "FREE ringtones every week! Txt TONES to 81234, 3 GBP/wk",
        "Your parcel is held. Pay the 1.99 fee at http://parcel-fee.example today",
        "Congratulations, you won a holiday! Reply YES to claim, 150p/msg",
        "URGENT: your account has a reward waiting, text CLAIM to 80086 now"]
HAM = ["running late, save me a seat pls", "mum says dinner at 7, bring bread",
       "did u get the notes from today? need them b4 fri", "happy birthday mate, drinks on me saturday",
       "the train is delayed, start without me"]


def _result(prompt: str, agreement: float, accuracy: float | None = None) -> CandidateResult:
    """A candidate's evidence with only what the rule reads."""
    return CandidateResult(prompt, "none", agreement, 0.0, 0.5, accuracy, 1.0)


def test_without_gold_the_candidate_agreeing_most_with_the_embedder_is_chosen():
    """Fewer than MIN_GOLD labels: agreement decides, and equal agreement keeps the earlier (default) candidate."""
    results = [_result("classify", 0.6), _result("classify_plain", 0.8), _result("classify_terse", 0.8)]
    gold = ["ham"] * (MIN_GOLD - 1) + [None]
    assert choose(results, [], gold) == (1, AGREEMENT, None)


def test_with_gold_the_most_accurate_candidate_is_chosen_and_its_accuracy_cross_fitted():
    """40 labels: the candidate right on every document wins; choosing on one half and scoring on the other gives 1.0."""
    gold = ["spam", "ham"] * 20
    results = [_result("classify", 0.9, 0.5), _result("classify_plain", 0.1, 1.0)]
    assert choose(results, [["ham"] * 40, list(gold)], gold) == (1, GOLD, 1.0)


def test_contextual_calibration_divides_by_the_content_free_probabilities():
    """A prompt that says 'ham' to content-free text at 0.8 has its pull removed: 0.7 ham becomes spam; the labeller
    applying the same prior in log space gives the same distribution."""
    from service.engines.base import EngineInfo
    from service.labelling.labeller import Annotation, Labeller, TunedPrompt
    from service.labelling.prompts import load_template
    from service.labelling.tuning import calibrated
    from service.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(REPO / "taxonomy" / "sms-spam.yaml")
    prior = (math.log(0.8), math.log(0.2))
    labeller = Labeller(taxonomy, "v", load_template("classify"), EngineInfo("e", "m"), 2000,
                        tuning=TunedPrompt("classify", "contextual", prior))
    seen = Annotation({"ham": 0.7, "spam": 0.3}, "ham", ["ham"], 0.7, ["ham"], False, None, chars_seen=10)
    [after] = calibrated([seen], labeller)
    assert after.label == "spam" and after.distribution["spam"] == pytest.approx(0.3 / 0.2 / (0.7 / 0.8 + 0.3 / 0.2))
    decided = labeller.decide([math.log(0.7) - 5.0, math.log(0.3) - 5.0])  # raw scores: any common offset
    assert decided.distribution == pytest.approx(after.distribution)
    assert labeller.spec["tuning"]["calibration"] == "contextual" and labeller.key != Labeller(
        taxonomy, "v", load_template("classify"), EngineInfo("e", "m"), 2000).key


def test_mutual_information_is_zero_for_a_constant_prompt_and_log2_for_a_sure_balanced_one():
    """A prompt that says the same thing whatever the text carries no information; a sure, balanced one carries log 2."""
    constant = [{"ham": 0.9, "spam": 0.1}] * 4
    sure = [{"ham": 1.0, "spam": 0.0}, {"ham": 0.0, "spam": 1.0}] * 2
    assert mutual_information(constant) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(sure) == pytest.approx(math.log(2))


def test_the_chance_test_tells_scores_that_follow_the_reference_from_ones_that_do_not():
    """A candidate equal to the reference gets the smallest p the shuffles resolve; a constant prompt follows any
    shuffle as well (p = 1); the best of 20 unrelated candidates, chosen among them, is not taken for informative,
    where it alone would come out as lucky as it is; a chosen candidate is tested, not the best of the others; rows
    the reference did not label (NaN) are left out, and a reference the same on every row (or on none) cannot be
    tested."""
    draw = np.random.default_rng(1)
    reference = np.eye(3)[np.tile([0, 1, 2], 20)]
    near_certain = 0.98 * reference + 0.01
    assert chance_p_value(near_certain[None], reference, 0) == pytest.approx(1 / (1 + PERMUTATIONS))
    constant = np.tile([[0.5, 0.3, 0.2]], (60, 1))
    assert chance_p_value(np.stack([constant, constant[:, ::-1]]), reference, 0) == 1.0
    assert chance_p_value(np.stack([constant, near_certain]), reference, 0) == 1.0  # the other's fit is not its own
    unrelated = draw.dirichlet(np.ones(3), size=(20, 60))
    follows = [float(np.sum((c - c.mean(0)) * (reference - reference.mean(0))) / (c - c.mean(0)).std())
               for c in unrelated]
    best = int(np.argmax(follows))
    assert chance_p_value(unrelated, reference, best) >= CHANCE_ALPHA > chance_p_value(unrelated[best][None],
                                                                                        reference, 0)
    padded = np.vstack([near_certain, np.tile([[0.9, 0.05, 0.05]], (9, 1))])
    assert chance_p_value(padded[None], np.vstack([reference, np.full((9, 3), np.nan)]), 0) == pytest.approx(
        1 / (1 + PERMUTATIONS))  # the unlabelled rows neither help nor hurt
    assert chance_p_value(near_certain[None], np.tile(np.eye(3)[:1], (60, 1)), 0) is None
    assert chance_p_value(near_certain[None], np.full((60, 3), np.nan), 0) is None


def test_the_chance_test_hears_a_prompt_whose_top_labels_never_move():
    """A prompt that puts the first label on top of every document, but gives each document's reference label a
    little more than the others do, follows the reference: its top labels could not show it (they agree with any
    shuffle as well), its distributions do. A reference given as distributions (the embedding annotator's) is read
    the same way; a candidate's missing rows (NaN: failed) count for nothing, and one sure, wrong row does not
    drown the rest."""
    truth = np.tile([0, 1, 2], 20)
    leaning = np.full((60, 3), 0.2)
    leaning[:, 0] = 0.6
    leaning[np.arange(60), truth] += 0.05
    leaning /= leaning.sum(axis=1, keepdims=True)
    assert (leaning.argmax(axis=1) == 0).all()
    assert chance_p_value(leaning[None], np.eye(3)[truth], 0) < CHANCE_ALPHA
    soft = 0.5 * np.eye(3)[truth] + 0.5 / 3
    leaning[:5] = np.nan
    leaning[5] = [1 - 2e-12, 1e-12, 1e-12]  # sure of the wrong label: the reference says 1
    assert chance_p_value(leaning[None], soft, 0) < CHANCE_ALPHA


def test_annotations_become_rows_the_chance_test_reads():
    """Distributions over the reference's options in its order (an option a labeller lacks is 0; one the reference
    lacks is dropped); a failed annotation or a blank one (all zero) is missing (NaN), an abstention keeps its
    distribution; gold labels become one-hot rows, NaN where a document has none."""
    from service.labelling.labeller import Annotation, failed

    def said(distribution: dict, label: str | None) -> Annotation:
        return Annotation(distribution=distribution, label=label, labels=[label] if label else [],
                          confidence=max(distribution.values(), default=0.0), candidates=[],
                          abstained=label is None, abstain_reason=None if label else "low_confidence")

    options = ("ham", "spam")
    rows = distributions([said({"spam": 0.8, "ham": 0.2}, "spam"), said({"ham": 0.55, "spam": 0.45}, None),
                          failed("engine lost"), said({"ham": 0.0, "spam": 0.0}, None),
                          said({"ham": 0.5, "none": 0.5}, "ham")], options)
    assert rows[[0, 1, 4]].tolist() == [[0.2, 0.8], [0.55, 0.45], [0.5, 0.0]]
    assert np.isnan(rows[2]).all() and np.isnan(rows[3]).all()
    hot = one_hot(["spam", None, "ham"], options)
    assert hot[[0, 2]].tolist() == [[0.0, 1.0], [1.0, 0.0]] and np.isnan(hot[1]).all()


@pytest.fixture(scope="module")
def tuned_taxonomy(service) -> str:
    """The SMS taxonomy pushed as ``sms-tuned``; returns its version."""
    text = (REPO / "taxonomy" / "sms-spam.yaml").read_text().replace("name: sms-spam", "name: sms-tuned", 1)
    with service.client() as client:
        pushed = client.post("/v1/taxonomies", content=text.encode())
    assert pushed.status_code in (200, 201), pushed.text
    return pushed.json()["version"]


def test_tuning_without_labels_chooses_by_agreement_and_jobs_use_the_choice(service, tuned_taxonomy):
    """Every candidate (chat and plain completion on the embedded engine) is measured; a job naming no prompt uses
    the stored choice and records it, and the choice is part of its annotator key."""
    documents = [{"text": json.loads(line)["text"]} for line in (FIXTURES / "sms.jsonl").read_text().splitlines()]
    with service.client() as client:
        answer = client.post("/v1/taxonomies/sms-tuned/tune", json={"documents": documents}, timeout=600)
        assert answer.status_code == 200, answer.text
        tuning = answer.json()
        candidates = {(c["prompt"], c["calibration"]): c for c in tuning["candidates"]}
        assert set(candidates) == {(p, c) for p in ("classify", "classify_terse", "classify_fewshot", "classify_plain")
                                   for c in ("none", "contextual")}
        assert tuning["criterion"] == AGREEMENT and tuning["labelled"] == 0 and tuning["cross_fitted_accuracy"] is None
        assert 0 < tuning["chance_p_value"] <= 1 and tuning["informative"] == (tuning["chance_p_value"] < CHANCE_ALPHA)
        best = max(c["agreement"] for c in candidates.values())
        assert candidates[tuning["prompt"], tuning["calibration"]]["agreement"] == best
        assert all(c["accuracy"] is None and 0 <= c["mutual_information"] <= math.log(2) + 1e-9
                   for c in candidates.values())
        stored = client.get("/v1/taxonomies/sms-tuned").json()["tunings"]
        assert [(t["model"], t["prompt"], t["calibration"], t["criterion"]) for t in stored] == [
            ("smollm2", tuning["prompt"], tuning["calibration"], AGREEMENT)]
        assert (stored[0]["prior"] is None) == (tuning["calibration"] == "none")
        job = wait_for_job(client, client.post("/v1/jobs", json={"taxonomy": "sms-tuned",
                                                                 "documents": documents[:3]}).json()["job_id"])
        assert job["status"] == "succeeded"
        [row] = sql(client, f"SELECT annotator_spec FROM jobs WHERE job_id = '{job['job_id']}'")
        spec = json.loads(row["annotator_spec"])
        assert spec["prompt"] == tuning["prompt"]
        assert spec["tuning"] == {"calibration": tuning["calibration"], "prior": (
            None if stored[0]["prior"] is None else [round(p, 6) for p in stored[0]["prior"]])}
        named = wait_for_job(client, client.post("/v1/jobs", json={
            "taxonomy": "sms-tuned", "documents": documents[:3],
            "annotators": [{"prompt": tuning["prompt"]}]}).json()["job_id"])
        same = named["annotators"][0]["annotator"] == job["annotators"][0]["annotator"]
        assert same == (tuning["calibration"] == "none")  # a named prompt runs uncalibrated


def test_tuning_with_labels_from_the_cli_chooses_by_cross_fitted_accuracy(service, tuned_taxonomy, tmp_path):
    """A CSV sample with 20 labelled rows: the choice is the most accurate prompt, with its cross-fitted accuracy."""
    rows = [(text, "spam") for text in SPAM] + [(text, "ham") for text in HAM]
    sample = tmp_path / "sample.csv"
    sample.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows * 2))
    done = service.cli("taxonomy", "tune", "sms-tuned", "--sample", str(sample))
    assert "by gold_accuracy (cross-fitted accuracy" in " ".join(done.stdout.split())  # rich wraps lines
    with service.client() as client:
        stored = client.get("/v1/taxonomies/sms-tuned").json()["tunings"][0]
    evidence = stored["evidence"]
    assert stored["criterion"] == GOLD and evidence["labelled"] == 20 and evidence["documents"] == 20
    best = max(c["accuracy"] for c in evidence["candidates"])
    assert next(c for c in evidence["candidates"] if c["prompt"] == stored["prompt"])["accuracy"] == best
    assert 0 <= evidence["cross_fitted_accuracy"] <= 1 and 0 <= evidence["embedding_accuracy"] <= 1


def test_a_calibrated_tuning_labels_batch_jobs_as_stream_jobs(service, tuned_taxonomy):
    """A tuning restricted to one calibrated candidate stores its prior; a batch job (shards rebuilt in Ray Data
    tasks) runs the same calibrated annotator as a stream job: same key, same labels."""
    texts = [json.loads(line)["text"] for line in (FIXTURES / "sms.jsonl").read_text().splitlines()]
    with service.client() as client:
        tuning = client.post("/v1/taxonomies/sms-tuned/tune", timeout=600, json={
            "documents": [{"text": t} for t in texts], "prompts": ["classify_fewshot"],
            "calibrations": ["contextual"]}).json()
        assert (tuning["prompt"], tuning["calibration"]) == ("classify_fewshot", "contextual")
        (service.input_dir / "tuned.jsonl").write_text(
            "".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        batch = wait_for_job(client, client.post("/v1/jobs", json={
            "taxonomy": "sms-tuned", "source": "tuned.jsonl", "mode": "batch", "shard_size": 5}).json()["job_id"])
        stream = wait_for_job(client, client.post("/v1/jobs", json={
            "taxonomy": "sms-tuned", "documents": [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)]}
        ).json()["job_id"])
        pairs = sql(client, "SELECT b.label AS batch_label, s.label AS stream_label FROM labels b JOIN labels s"
                            f" ON s.doc_id = b.doc_id AND s.job_id = '{stream['job_id']}'"
                            f" WHERE b.job_id = '{batch['job_id']}'")
    assert batch["status"] == stream["status"] == "succeeded" and batch["annotator"] == stream["annotator"]
    assert len(pairs) == len(texts) and all(p["batch_label"] == p["stream_label"] for p in pairs), pairs


@pytest.mark.parametrize("body, status, words", [
    ({"documents": [{"text": "hi", "label": "phishing"}, {"text": "yo"}]}, 422, "documents[0].label 'phishing'"),
    ({"documents": [{"text": "hi"}, {"text": "yo"}], "model": "llama", "prompts": ["classify_plain"]}, 422,
     "plain-text completion"),
    ({"documents": [{"text": "hi"}]}, 422, "documents"),
])
def test_bad_tuning_requests_are_refused_naming_the_field(service, tuned_taxonomy, body, status, words):
    """A label outside the taxonomy, a plain-text prompt on a server model, a one-document sample: 4xx, named."""
    with service.client() as client:
        answer = client.post("/v1/taxonomies/sms-tuned/tune", json=body)
    assert answer.status_code == status and words in answer.text, answer.text


@pytest.mark.parametrize("module, guard, route, body, words", [
    ("taxonomies", "TUNING", "/v1/taxonomies/sms-spam/tune", {"documents": [{"text": "hi"}, {"text": "yo"}]},
     "prompt tuning"),
    ("quality", "RECOMPUTING", "/v1/jobs/any/label-issues", {"kind": "llm"}, "label-issue ranking"),
    ("quality", "RECOMPUTING", "/v1/jobs/any/aggregate", {"method": "refined"}, "re-aggregation"),
])
def test_a_second_long_run_of_the_same_caller_is_refused_while_one_runs(in_process, module, guard, route, body, words):
    """A tuning, a label-issue ranking or a re-aggregation takes minutes on the ingress's threads: another from the
    same caller meanwhile is 429, and job submissions are not held back."""
    import asyncio
    import importlib

    lock = getattr(importlib.import_module(f"service.api.{module}"), guard)._locks[None]  # the loopback caller's
    asyncio.run(lock.acquire())  # uncontended: takes the lock without binding it to this loop
    try:
        refused = in_process.client.post(route, json=body)
        submitted = in_process.client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": [{"text": "hi"}]})
    finally:
        lock.release()
    assert refused.status_code == 429 and words in refused.text, refused.text
    assert submitted.status_code == 202, submitted.text
