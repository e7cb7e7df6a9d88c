"""The job runner on a real DuckDB file: failures isolated, cancellation, cache, resume after restart.

The engine here is the package's FakeEngine (word overlap, with failure triggers)
because these tests inject faults the real model cannot be made to produce on demand;
the labelling quality path is covered by the end-to-end tests with the real model.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import REPO

from service.documents import check_document
from service.engines.fake import FakeEngine
from service.errors import InvalidInput
from service.labelling.scoring import engine_scorer
from service.store import Store
from service.store.jobs import document_batch
from service.store.taxonomies import Pushed
from service.taxonomy import load_taxonomy, parse_taxonomy
from service.work.jobs import JobRunner
from service.work.panels import Model, job_record

TAXONOMY = REPO / "taxonomy" / "sms-spam.yaml"


def _store(tmp_path) -> Store:
    """A real store in a temp dir with the SMS taxonomy pushed."""
    store = Store(tmp_path / "db.duckdb", export_dir=tmp_path / "exports")
    store.taxonomies.put(load_taxonomy(TAXONOMY), TAXONOMY.read_text())
    return store


def _submit(store: Store, runner: JobRunner, job_id: str, texts: list[str], batch_size: int = 4,
            annotators: list[dict] | None = None, aggregation: str | None = None) -> None:
    """Create a job the way the API does, without queueing it."""
    panel = runner.panels.panel("sms-spam", None, None, annotators)
    rows = [check_document(f"documents[{i}]", f"d{i:03d}", text, None, max_chars=10_000) for i, text in enumerate(texts)]
    batches = [document_batch(job_id, rows[i:i + batch_size], i) for i in range(0, len(rows), batch_size)]
    store.jobs.create(job_id=job_id, taxonomy="sms-spam", model="fake", batches=iter(batches),
                     **job_record(panel, aggregation=aggregation))


async def _runner(store: Store, engine: FakeEngine, batch_size: int = 4) -> JobRunner:
    """A runner with the fake engine (must be built inside the event loop)."""
    models = {"fake": Model("fake", engine_scorer(engine), engine.info)}
    return JobRunner(store, models, "fake", batch_size=batch_size, model_input_chars=100)


def test_failing_documents_are_recorded_and_the_rest_finish(tmp_path):
    """One document makes the engine raise, one gets malformed output; the other eight finish."""
    store = _store(tmp_path)
    texts = [f"spam offer number {i}" for i in range(8)] + ["FAIL_ENGINE please", "MALFORMED_OUTPUT here"]

    async def scenario():
        runner = await _runner(store, FakeEngine())
        _submit(store, runner, "job_faults", texts)
        await runner.run("job_faults")
        await runner.close()

    asyncio.run(scenario())
    job = store.jobs.get("job_faults")
    assert (job.status, job.done, job.failed) == ("succeeded", 8, 2)
    errors = {row["doc_id"]: row["error"] for row in store.annotations.failures("job_faults")}
    assert errors["d008"].startswith("EngineError: fake engine failure")
    assert errors["d009"].startswith("malformed engine output: expected 2 scores, got 1")


def test_resume_after_restart_neither_loses_nor_duplicates(tmp_path):
    """Stop a runner mid-job, reopen the file in a new store, resume: every document once."""
    texts = [f"message {i} about a free prize" for i in range(40)]

    async def first_process():
        store = _store(tmp_path)
        runner = await _runner(store, FakeEngine(delay_s=0.05))
        _submit(store, runner, "job_restart", texts)
        runner.submit("job_restart")
        while store.jobs.get("job_restart").done < 8:
            await asyncio.sleep(0.01)
        await runner.close()  # like a killed service: the job stays 'running'
        done = store.jobs.get("job_restart").done
        store.close()
        return done

    done_before = asyncio.run(first_process())
    assert 8 <= done_before < 40

    async def second_process():
        store = Store(tmp_path / "db.duckdb", export_dir=tmp_path / "exports")
        engine = FakeEngine()
        runner = await _runner(store, engine)
        assert runner.resume() == ["job_restart"]
        while store.jobs.get("job_restart").status == "running":
            await asyncio.sleep(0.02)
        await runner.close()
        return store, engine

    store, engine = asyncio.run(second_process())
    job = store.jobs.get("job_restart")
    assert (job.status, job.done, job.failed) == ("succeeded", 40, 0)
    counts = store.cursor().execute(
        "SELECT count(*), count(DISTINCT doc_id) FROM annotations WHERE job_id = 'job_restart'").fetchone()
    assert counts == (40, 40)
    assert engine.calls == -(-(40 - done_before) // 4)  # only the remaining batches were scored


def _cancel_midway(store: Store, job_id: str, texts: list[str], done, *, settle_s: float, **panel) -> dict:
    """Run a job on a slow fake engine, cancel it once ``done(job)`` reaches 2, let it settle; the job then."""

    async def scenario():
        runner = await _runner(store, FakeEngine(delay_s=0.05), batch_size=2)
        _submit(store, runner, job_id, texts, **panel)
        runner.submit(job_id)
        while done(store.jobs.get(job_id)) < 2:
            await asyncio.sleep(0.01)
        assert store.jobs.set_status(job_id, "cancelled", only_if_active=True)
        await asyncio.sleep(settle_s)
        await runner.close()

    asyncio.run(scenario())
    return store.jobs.get(job_id)


def test_cancel_stops_between_batches(tmp_path):
    """A cancelled job keeps what it finished and labels nothing more."""
    store = _store(tmp_path)
    job = _cancel_midway(store, "job_cancel", [f"text {i}" for i in range(30)], lambda job: job.done, settle_s=0.3)
    assert job.status == "cancelled" and 2 <= job.done <= 6
    assert not store.jobs.set_status("job_cancel", "cancelled", only_if_active=True)


def test_a_cancelled_panel_job_keeps_the_aggregate_of_what_was_labelled(tmp_path):
    """Several annotators, cancelled midway: the documents every member labelled get their aggregated label."""
    store = _store(tmp_path)
    job = _cancel_midway(store, "job_panel_cancel", [f"text {i}" for i in range(400)],
                         lambda job: min(a.done for a in job.annotators), settle_s=0.5,
                         annotators=[{"kind": "llm"}, {"kind": "embedding"}], aggregation="calibrated_mean")
    aggregated = store.database.rows("SELECT count(*) AS n FROM annotations WHERE job_id = ? AND annotator = ?",
                              ["job_panel_cancel", job.annotator])[0]["n"]
    llm_done = job.annotators[0].done  # 400 × 50 ms of fake LLM: far from done when cancelled
    assert job.status == "cancelled" and 2 <= llm_done < 400 and aggregated >= llm_done


def test_cache_serves_repeated_texts_across_jobs(tmp_path):
    """A second job with the same texts and annotator is answered from stored annotations."""
    store = _store(tmp_path)
    engine = FakeEngine()

    async def scenario():
        runner = await _runner(store, engine)
        _submit(store, runner, "job_a", ["free spam prize", "hello friend"])
        await runner.run("job_a")
        calls = engine.calls
        _submit(store, runner, "job_b", ["hello friend", "free spam prize", "a new text"])
        await runner.run("job_b")
        await runner.close()
        return calls

    calls_after_first = asyncio.run(scenario())
    assert engine.calls == calls_after_first + 1
    job = store.jobs.get("job_b")
    assert (job.done, job.cached) == (3, 2)


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_finished_jobs_are_not_resumed(tmp_path, status):
    """Only queued and running jobs come back after a restart."""
    store = _store(tmp_path)

    async def scenario():
        runner = await _runner(store, FakeEngine())
        _submit(store, runner, "job_done", ["text"])
        store.jobs.set_status("job_done", status)
        resumed = runner.resume()
        await runner.close()
        return resumed

    assert asyncio.run(scenario()) == []


def test_blank_documents_abstain_without_the_engine(tmp_path):
    """Empty and whitespace-only texts are abstained as empty_text and never scored."""
    store = _store(tmp_path)
    engine = FakeEngine()

    async def scenario():
        runner = await _runner(store, engine)
        _submit(store, runner, "job_blank", ["", "   \n", "free spam prize"])
        await runner.run("job_blank")
        await runner.close()

    asyncio.run(scenario())
    rows = store.cursor().execute(
        "SELECT doc_id, abstained, abstain_reason FROM annotations WHERE job_id = 'job_blank' ORDER BY doc_id").fetchall()
    assert rows == [("d000", True, "empty_text"), ("d001", True, "empty_text"), ("d002", False, None)]
    assert engine.calls == 1


def test_pushing_an_older_version_again_makes_it_current(tmp_path):
    """Push A, push B, push A: new jobs use A."""
    store = Store(tmp_path / "db.duckdb", export_dir=tmp_path / "exports")
    text_a = TAXONOMY.read_text()
    text_b = text_a.replace("Short text messages (SMS)", "Short mobile messages (SMS)")
    first = store.taxonomies.put(load_taxonomy(TAXONOMY), text_a)
    version_a, version_b = first.version, store.taxonomies.put(parse_taxonomy(text_b), text_b).version
    assert store.taxonomies.get("sms-spam").version == version_b
    assert store.taxonomies.put(load_taxonomy(TAXONOMY), text_a) == Pushed(version_a, created=False) and first.created
    assert store.taxonomies.get("sms-spam").version == version_a
    assert [v["version"] for v in store.taxonomies.versions("sms-spam")] == [version_a, version_b]


def test_several_annotators_each_write_rows_and_are_aggregated(tmp_path):
    """Two prompts on the fake engine and the real embedding annotator label every document, then vote.

    Each annotator writes its own annotations; the job's labels are the aggregate; a unanimous
    document gets the unanimous label; re-aggregating with another method replaces the rows.
    """
    store = _store(tmp_path)
    texts = ["FREE ringtone txt TONES to 81234 now, prize claim call", "see you at dinner tonight mum",
             "URGENT you have won a cash prize call now", "running late, save me a seat", "   "]
    annotators = [{"kind": "llm", "prompt": "classify"}, {"kind": "llm", "prompt": "classify_terse"},
                  {"kind": "embedding"}]

    async def scenario():
        runner = await _runner(store, FakeEngine())
        _submit(store, runner, "job_panel", texts, annotators=annotators, aggregation="majority_vote")
        await runner.run("job_panel")
        await runner.close()
        return runner

    runner = asyncio.run(scenario())
    job = store.jobs.get("job_panel")
    assert job.status == "succeeded" and job.annotator_spec["aggregation"] == "majority_vote"
    assert [a.name for a in job.annotators] == ["fake/classify", "fake/classify_terse", "embedding"]
    assert all(a.done == len(texts) for a in job.annotators)
    assert job.done == len(texts) and job.abstained >= 1  # the blank text abstains everywhere
    votes = {}
    for row in store.annotations.member_rows("job_panel"):
        votes.setdefault(row["doc_id"], []).append(row["label"])
    labels = {row["doc_id"]: row["label"]
              for row in store.database.rows("SELECT doc_id, label FROM labels WHERE job_id = 'job_panel'")}
    unanimous = {doc: v[0] for doc, v in votes.items() if v[0] is not None and len(set(v)) == 1}
    assert unanimous and all(labels[doc] == label for doc, label in unanimous.items())
    assert runner.aggregate("job_panel", "dawid_skene") == "dawid_skene"
    assert store.jobs.get("job_panel").annotator_spec["aggregation"] == "dawid_skene"
    count = store.database.rows("SELECT count(*) AS n FROM annotations WHERE job_id = 'job_panel' AND annotator = ?",
                         [job.annotator])[0]["n"]
    assert count == len(texts)


def test_several_annotators_need_distinct_names_and_a_single_label_taxonomy(tmp_path):
    """Duplicate annotators and a panel on a multi-label taxonomy are refused with messages that say why."""
    store = _store(tmp_path)

    async def scenario():
        runner = await _runner(store, FakeEngine())
        with pytest.raises(InvalidInput, match="same annotator"):
            runner.panels.panel("sms-spam", None, None, [{"kind": "llm"}, {"kind": "llm", "name": "again"}])
        with pytest.raises(InvalidInput, match="used twice"):
            runner.panels.panel("sms-spam", None, None, [{"kind": "llm", "name": "x"}, {"kind": "embedding", "name": "x"}])
        await runner.close()

    asyncio.run(scenario())


def test_a_queued_default_job_is_weighed_by_the_tuning_it_starts_with(tmp_path):
    """A default panel created under a tuning no better than chance weighs its LLM 0; if an informative tuning lands
    before the job labels anything, the job runs and weighs the LLM again (the 0 was the test's, not the job's)."""
    from service.labelling.labeller import TunedPrompt

    store = _store(tmp_path)
    version = store.taxonomies.get("sms-spam").version
    texts = ["free prize now", "see you at six"]

    async def scenario():
        runner = await _runner(store, FakeEngine())
        store.taxonomies.put_tuning("sms-spam", version, "fake", TunedPrompt("classify_terse", informative=False),
                                    "embedding_agreement", {})
        panel = runner.panels.panel("sms-spam", None, None, [{"kind": "llm"}, {"kind": "embedding"}], default=True)
        rows = [check_document(f"documents[{i}]", f"d{i}", text, None, max_chars=100) for i, text in enumerate(texts)]
        store.jobs.create(job_id="job_default", taxonomy="sms-spam", model="fake",
                          batches=iter([document_batch("job_default", rows, 0)]),
                          **job_record(panel, aggregation="refined", default=True))
        assert store.jobs.get("job_default").annotators[0].weight == 0.0
        store.taxonomies.put_tuning("sms-spam", version, "fake", TunedPrompt("classify"), "embedding_agreement",
                                    {})
        await runner.run("job_default")
        await runner.close()

    asyncio.run(scenario())
    job = store.jobs.get("job_default")
    assert job.status == "succeeded" and job.annotator_spec["members"][0]["prompt"] == "classify"
    assert [(a.weight, a.done) for a in job.annotators] == [(None, 2), (None, 2)]


def test_a_tuning_that_lands_while_a_job_is_queued_rekeys_it_and_one_that_lands_mid_job_refuses_it(tmp_path):
    """A job that has labelled nothing takes the tuned prompt when it starts; one with labels keeps being refused."""
    from service.labelling.labeller import TunedPrompt

    store = _store(tmp_path)
    version = store.taxonomies.get("sms-spam").version

    async def scenario():
        runner = await _runner(store, FakeEngine())
        _submit(store, runner, "job_queued", ["free prize now", "see you at six"])
        _submit(store, runner, "job_started", ["free prize now", "see you at six"])
        await runner.run("job_started")
        store.taxonomies.put_tuning("sms-spam", version, "fake", TunedPrompt("classify_terse"), "embedding_agreement", {})
        await runner.run("job_queued")
        with pytest.raises(RuntimeError, match="resubmit"):
            runner._job_panel(store.jobs.get("job_started"))
        await runner.close()

    asyncio.run(scenario())
    queued = store.jobs.get("job_queued")
    assert queued.status == "succeeded" and queued.annotator_spec["prompt"] == "classify_terse"
