"""Gold samples, human labels, the quality report, calibration, DSL estimates and label issues on a real store.

The LLM is simulated (annotations written straight into a real DuckDB store, with a known
bias), so that the truth is known; every expected number is derived here from the data,
through SQL on the ``gold`` and ``labels`` views, not copied from a run.
"""

from __future__ import annotations

import csv
import io
import json
from xml.etree import ElementTree

import numpy as np
import pytest
from conftest import REPO

from service.documents import check_document
from service.errors import Conflict, InvalidInput
from service.labelling.labeller import decide_single
from service.quality import gold
from service.quality import report as quality
from service.store import Store
from service.store.annotations import annotation_row
from service.store.jobs import document_batch
from service.taxonomy import NONE_LABEL, load_taxonomy

TAXONOMY = load_taxonomy(REPO / "taxonomy" / "sms-spam.yaml")
N = 600


def _job(tmp_path, seed: int = 0, ids: list[str] | None = None) -> tuple[Store, dict[str, str]]:
    """A finished job of N messages (or one per id, each text starting with its id) whose simulated LLM
    over-calls spam; returns the store and the true labels."""
    rng = np.random.default_rng(seed)
    store = Store(tmp_path / "db.duckdb", export_dir=tmp_path / "exports")
    version = store.taxonomies.put(TAXONOMY, (REPO / "taxonomy" / "sms-spam.yaml").read_text()).version
    truth = {doc_id: "spam" if rng.random() < 0.3 else "ham" for doc_id in ids or [f"d{i:04d}" for i in range(N)]}
    channels = rng.choice(["sms", "whatsapp"], size=len(truth))
    text = "{} message " if ids else "message {} "
    docs = [check_document(f"documents[{i}]", doc_id, text.format(doc_id) + "x" * int(rng.integers(0, 50)),
                           {"length": float(rng.integers(5, 200)), "channel": str(channels[i])},
                           max_chars=1000) for i, doc_id in enumerate(truth)]
    store.jobs.create(job_id="job_q", taxonomy="sms-spam", version=version, model="sim", annotator="sim",
                     annotator_spec={}, annotators=[], batches=iter([document_batch("job_q", docs, 0)]))
    rows = []
    for doc in docs:
        p_spam = rng.beta(6, 2) if truth[doc["doc_id"]] == "spam" else rng.beta(2, 4)  # biased towards spam
        annotation = decide_single({"ham": 1 - p_spam, "spam": p_spam}, TAXONOMY)
        rows.append(annotation_row(annotation, job_id="job_q", doc_id=doc["doc_id"], annotator="sim", model="sim",
                                   engine="sim", prompt_hash=None, taxonomy_version=version, decoding="{}",
                                   text_hash=doc["text_hash"], cached=False, latency_ms=0.0))
    store.annotations.write(rows)
    store.jobs.set_status("job_q", "succeeded")
    return store, truth


def _sql(store: Store, query: str, params: list | None = None) -> list[tuple]:
    """Rows of a read on the store's own instance."""
    return store.cursor().execute(query, params or []).fetchall()


def _label_sample_by_csv(store: Store, truth: dict[str, str], flipped: set[str] = frozenset()) -> int:
    """Export the sample as CSV, fill it in as a person would (flipping some), and import it."""
    exported = gold.to_csv(store.quality.sample("job_q"))
    rows = list(csv.DictReader(io.StringIO(exported)))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=gold.CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        label = truth[row["doc_id"]]
        if row["doc_id"] in flipped:
            label = "ham" if label == "spam" else "spam"
        writer.writerow({**row, "label": label, "annotator": "alice"})
    parsed = gold.parse_upload(out.getvalue().encode(), "text/csv", None)
    return gold.put_labels(store, "job_q", parsed, max_annotators=10)["labelled"]


def test_gold_sample_designs_store_inclusion_probabilities(tmp_path):
    """Each design stores one π per drawn document; stratified πs are n_h/N_h; a second draw needs replace."""
    store, _ = _job(tmp_path)
    drawn = gold.draw(store, "job_q", size=120, design="stratified", seed=1, replace=False)
    assert drawn["size"] == 120 and sum(drawn["by_predicted_label"].values()) == 120
    per_stratum = _sql(store, "SELECT stratum, count(*), any_value(inclusion_prob), min(inclusion_prob) ="
                              " max(inclusion_prob) FROM gold_samples WHERE job_id = 'job_q' GROUP BY 1")
    population = dict(_sql(store, "SELECT label, count(*) FROM labels WHERE job_id = 'job_q' GROUP BY 1"))
    for stratum, n, pi, constant in per_stratum:
        assert constant and pi == pytest.approx(n / population[stratum])
    with pytest.raises(Conflict, match="replace"):
        gold.draw(store, "job_q", size=50, design="random", seed=2, replace=False)
    drawn = gold.draw(store, "job_q", size=80, design="uncertainty", seed=2, replace=True)
    confidence_vs_pi = _sql(store, "SELECT corr(l.confidence, s.inclusion_prob) FROM gold_samples s JOIN labels l"
                                   " USING (job_id, doc_id) WHERE job_id = 'job_q'")[0][0]
    assert confidence_vs_pi < -0.5  # low confidence, high inclusion probability
    with pytest.raises(InvalidInput, match="more than"):
        gold.draw(store, "job_q", size=N + 1, design="random", seed=0, replace=True)


def test_human_labels_are_checked_and_round_trip_through_csv_and_label_studio(tmp_path):
    """Unknown labels and unsampled documents are refused by name; CSV and Label Studio exports import back."""
    store, truth = _job(tmp_path)
    gold.draw(store, "job_q", size=40, design="random", seed=0, replace=False)
    sample = store.quality.sample("job_q")
    first = sample[0]["doc_id"]
    with pytest.raises(InvalidInput, match="row 1: 'maybe'"):
        gold.put_labels(store, "job_q", [(first, "alice", "maybe")], max_annotators=10)
    outside = next(doc for doc in truth if doc not in {r["doc_id"] for r in sample})
    with pytest.raises(InvalidInput, match="not in job job_q's gold sample"):
        gold.put_labels(store, "job_q", [(outside, "alice", "ham")], max_annotators=10)
    with pytest.raises(InvalidInput, match="from 3 people, over the limit of 2 .ANNOTATE_GOLD_MAX_ANNOTATORS"):
        gold.put_labels(store, "job_q", [(first, name, "ham") for name in ("ann", "bob", "cy")], max_annotators=2)
    with pytest.raises(InvalidInput, match="missing column"):
        gold.parse_upload(b"id,answer\n1,ham\n", "text/csv", "alice")
    assert _label_sample_by_csv(store, truth) == 40
    tasks = gold.to_label_studio(sample[:5])
    exported = [dict(task, annotations=[{"completed_by": {"email": "bob@example.org"},
                                         "result": [{"type": "choices", "value": {"choices": [truth[task["data"]["doc_id"]]]}}]}])
                for task in tasks]
    rows = gold.parse_upload(json.dumps(exported).encode(), "application/json", None)
    assert rows == [(t["data"]["doc_id"], "bob@example.org", truth[t["data"]["doc_id"]]) for t in tasks]
    gold.put_labels(store, "job_q", rows, max_annotators=10)
    agreement = _sql(store, "SELECT min(human_agreement), max(human_annotators) FROM gold WHERE job_id = 'job_q'")[0]
    assert agreement == (1.0, 2)


@pytest.mark.parametrize("body, content_type, problem", [
    (json.dumps([{"data": {"doc_id": "d1"}, "annotations": [1]}]), "application/json",
     r"task \[0\] 'annotations' \[0\] must be an object, got int"),
    (json.dumps([{"data": {"doc_id": "d1"}, "annotations": {}}]), "application/json",
     r"task \[0\] 'annotations' must be a list, got dict"),
    (json.dumps([{"data": {"doc_id": "d1"}, "annotations": [{"result": [5]}]}]), "application/json",
     r"task \[0\] annotation \[0\] 'result' \[0\] must be an object, got int"),
    (json.dumps([{"data": {"doc_id": "d1"}, "annotations": [{"result": [{"value": {"choices": "ham"}}]}]}]),
     "application/json", r"result \[0\] 'choices' must be a list, got str"),
])
def test_malformed_uploads_are_refused_by_name(body, content_type, problem):
    """A Label Studio export of the wrong shape is a 4xx naming where it went wrong, not a crash."""
    with pytest.raises(InvalidInput, match=problem):
        gold.parse_upload(body.encode(), content_type, "alice")


def test_a_long_exported_text_and_old_mac_line_ends_read_back():
    """The export writes each document whole, and a document may pass the csv module's 128 kB cell default; a
    spreadsheet may save with \\r line ends: both upload."""
    long_text = "word " * 40_000
    filled = gold.to_csv([{"doc_id": "d1", "text": long_text}]).replace(",,\r\n", ",ham,bob\r\n")
    assert gold.parse_upload(filled.encode(), "text/csv", None) == [("d1", "bob", "ham")]
    assert gold.parse_upload(b"doc_id,label\rd1,ham\rd2,spam\r", "text/csv", "alice") == [
        ("d1", "alice", "ham"), ("d2", "alice", "spam")]


def test_csv_export_cannot_run_formulas_and_imports_back_to_the_same_documents(tmp_path):
    """Cells a spreadsheet would evaluate start with a quote; the import drops exactly that quote."""
    ids = ["=1+1", "+cmd", "-2", "@SUM(A1)", "\tx", "\rx", "'=kept", "'plain", "plain", "a=b"]
    store, _ = _job(tmp_path, ids=ids)
    gold.draw(store, "job_q", size=len(ids), design="random", seed=0, replace=False)
    exported = gold.to_csv(store.quality.sample("job_q"))
    rows = list(csv.DictReader(io.StringIO(exported)))
    for row in rows:
        for column in ("doc_id", "text"):
            assert not row[column].startswith(("=", "+", "-", "@", "\t", "\r")), row
    assert {row["doc_id"] for row in rows} == {"'=1+1", "'+cmd", "'-2", "'@SUM(A1)", "'\tx", "'\rx", "''=kept",
                                               "''plain", "plain", "a=b"}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=gold.CSV_COLUMNS)
    writer.writeheader()
    writer.writerows({**row, "label": "ham", "annotator": "alice"} for row in rows)
    parsed = gold.parse_upload(out.getvalue().encode(), "text/csv", None)
    assert sorted(doc_id for doc_id, _, _ in parsed) == sorted(ids)
    assert gold.put_labels(store, "job_q", parsed, max_annotators=10)["labelled"] == len(ids)
    saved_bare = gold.parse_upload(b"doc_id,label\n=1+1,spam\n", "text/csv", "bob")  # a spreadsheet dropped the '
    assert saved_bare == [("=1+1", "bob", "spam")]


def test_label_studio_config_quotes_label_names():
    """Label names that would break out of the XML come back as the values of their choices."""
    labels = ['a" onload="x', "</Choices><script>alert(1)</script>", "b & c", "it's"]
    config = ElementTree.fromstring(gold.label_studio_config(labels))
    assert [choice.get("value") for choice in config.iter("Choice")] == [*labels, NONE_LABEL]
    assert not list(config.iter("script"))


def test_report_matches_weighted_sql_and_is_kept_as_tables(tmp_path):
    """Accuracy equals Σ w·1{right} / Σ w over the gold view; the tables hold the same numbers."""
    store, truth = _job(tmp_path)
    with pytest.raises(Conflict, match="no gold labels"):
        quality.report(store, "job_q")
    gold.draw(store, "job_q", size=150, design="uncertainty", seed=3, replace=False)
    labelled = _label_sample_by_csv(store, truth)
    result = quality.report(store, "job_q")
    expected = _sql(store, "SELECT sum(weight * (gold_label = llm_label)::INT) / sum(weight) FROM gold"
                           " WHERE job_id = 'job_q' AND NOT abstained")[0][0]
    assert result["n"] == labelled and result["accuracy"]["estimate"] == pytest.approx(expected)
    kept = dict(_sql(store, "SELECT metric, value FROM quality_metrics WHERE job_id = 'job_q' AND label IS NULL"))
    assert kept["accuracy"] == pytest.approx(expected) and kept["ece"] == pytest.approx(result["ece"])
    assert _sql(store, "SELECT sum(n) FROM confusion_matrix WHERE job_id = 'job_q'")[0][0] == labelled
    assert _sql(store, "SELECT count(*) FROM selective_accuracy WHERE job_id = 'job_q'")[0][0] == len(result["selective"])
    spam = next(r for r in result["per_label"] if r["label"] == "spam")
    precision = _sql(store, "SELECT sum(weight * (gold_label = 'spam')::INT) / sum(weight) FROM gold"
                            " WHERE job_id = 'job_q' AND llm_label = 'spam'")[0][0]
    assert spam["precision"] == pytest.approx(precision)


def test_calibration_sets_the_conformal_candidates_of_every_label(tmp_path):
    """The threshold keeps held-out coverage near 1−α, and the labels view applies it to every document."""
    store, truth = _job(tmp_path)
    gold.draw(store, "job_q", size=200, design="random", seed=4, replace=False)
    _label_sample_by_csv(store, truth)
    result = quality.calibrate(store, "job_q", alpha=0.1, target_accuracy=0.9)
    assert 0 < result["threshold"] < 1 and result["mean_coverage"] >= 0.9 - 0.03
    abstain = result["abstention"]
    assert abstain["threshold"] is not None and abstain["accuracy"] >= 0.9
    rows = _sql(store, "SELECT distribution, conformal_candidates FROM labels WHERE job_id = 'job_q'")
    for distribution, candidates in rows:
        expected = sorted((k for k, p in distribution.items() if p >= result["threshold"]),
                          key=lambda k: -distribution[k])
        assert candidates == expected


def test_estimates_put_dsl_beside_naive_and_gold_only(tmp_path, monkeypatch):
    """Naive is the LLM's top-label share; gold-only the Hájek share; DSL is tighter than gold-only."""
    store, truth = _job(tmp_path)
    gold.draw(store, "job_q", size=150, design="random", seed=5, replace=False)
    _label_sample_by_csv(store, truth)
    result = quality.estimate(store, "job_q", target="proportions")
    spam = next(r for r in result["estimates"] if r["label"] == "spam")
    naive = _sql(store, "SELECT avg((distribution['spam'] > distribution['ham'])::INT) FROM labels"
                        " WHERE job_id = 'job_q'")[0][0]
    hajek = _sql(store, "SELECT sum(weight * (gold_label = 'spam')::INT) / sum(weight) FROM gold"
                        " WHERE job_id = 'job_q'")[0][0]
    assert spam["naive"]["estimate"] == pytest.approx(naive)
    assert spam["gold_only"]["estimate"] == pytest.approx(hajek)
    assert spam["dsl"]["se"] < spam["gold_only"]["se"]
    regression = quality.estimate(store, "job_q", target="regression", outcome="spam",
                                  covariates=["length", "channel", "text_chars"], model="logistic")
    assert [r["name"] for r in regression["estimates"]] == ["intercept", "length", "channel=whatsapp", "text_chars"]
    with pytest.raises(InvalidInput, match="singular"):
        quality.estimate(store, "job_q", target="regression", outcome="spam", covariates=["length", "length"])
    with pytest.raises(InvalidInput, match="no meta field 'missing'"):
        quality.estimate(store, "job_q", target="regression", outcome="spam", covariates=["missing"])
    monkeypatch.setattr(quality, "MAX_COVARIATE_COLUMNS", 1)  # a string field unique per document would be 100k columns
    with pytest.raises(InvalidInput, match="would pass 1 regression columns"):
        quality.estimate(store, "job_q", target="regression", outcome="spam", covariates=["length", "channel"])


def test_label_issues_put_planted_human_mistakes_first(tmp_path):
    """Five gold labels flipped against a confident, right LLM rank among the most suspicious."""
    store, truth = _job(tmp_path)
    gold.draw(store, "job_q", size=150, design="random", seed=6, replace=False)
    confident = _sql(store, "SELECT g.doc_id FROM gold_samples g JOIN labels l USING (job_id, doc_id)"
                            " WHERE job_id = 'job_q' ORDER BY l.confidence DESC LIMIT 40")
    planted = {doc for (doc,) in confident if truth[doc] == "spam"}
    planted = set(sorted(planted)[:5])
    _label_sample_by_csv(store, truth, flipped=planted)
    result = quality.label_issues(store, "job_q", kind="gold", limit=10)
    assert planted <= {row["doc_id"] for row in result["rows"]}
    assert all(row["is_issue"] for row in result["rows"] if row["doc_id"] in planted)
    assert _sql(store, "SELECT count(*) FROM label_issues WHERE job_id = 'job_q' AND kind = 'gold'")[0][0] == \
        result["checked"]


def test_gold_labels_of_one_class_rank_nothing_instead_of_failing(tmp_path):
    """Confident learning needs two classes: one gold class is an empty ranking, not cleanlab's 500."""
    store, _ = _job(tmp_path)
    gold.draw(store, "job_q", size=20, design="random", seed=1, replace=False)
    rows = [(row["doc_id"], "alice", "ham") for row in store.quality.sample("job_q")]
    gold.put_labels(store, "job_q", rows, max_annotators=10)
    ranked = quality.label_issues(store, "job_q", kind="gold")
    assert {k: v for k, v in ranked.items() if k != "computed_at"} == {"job_id": "job_q", "kind": "gold", "checked": 0,
                                                                        "issues": 0, "rows": []}


def test_reads_return_what_the_last_write_computed(tmp_path):
    """A report and a label-issue ranking are computed on a write and kept; reading them computes and writes nothing."""
    store, truth = _job(tmp_path)
    quality.refresh_report(store, "job_q")  # no gold labels yet: nothing to keep, and no error
    with pytest.raises(Conflict, match="no quality report yet"):
        quality.stored_report(store, "job_q")
    with pytest.raises(Conflict, match="no ranking of gold label issues yet"):
        quality.stored_label_issues(store, "job_q", kind="gold")
    gold.draw(store, "job_q", size=120, design="random", seed=7, replace=False)
    _label_sample_by_csv(store, truth)
    computed = quality.report(store, "job_q")
    ranked = quality.label_issues(store, "job_q", kind="gold", limit=5)
    kept = "SELECT kind, computed_at FROM quality_results WHERE job_id = 'job_q' ORDER BY kind"
    metrics = "SELECT count(*), max(computed_at) FROM quality_metrics WHERE job_id = 'job_q'"
    before = (_sql(store, kept), _sql(store, metrics))
    read = quality.stored_report(store, "job_q")
    assert read["computed_at"] == computed["computed_at"]
    assert read["accuracy"] == pytest.approx(computed["accuracy"]) and read["shares"]["estimates"]
    assert quality.stored_label_issues(store, "job_q", kind="gold", limit=5) == ranked
    assert (_sql(store, kept), _sql(store, metrics)) == before
