"""Long documents read by design: windows, head and tail, combined scores, chars_seen, the key and the API.

Texts are built so every cut can be derived on paper: words of five characters ("w007 ")
put a whitespace at every fifth position. No Ray: the fake engine in this process.
"""

from __future__ import annotations

import asyncio
import math
from itertools import pairwise

import pytest
from conftest import REPO, sql, wait_for_job

from service.engines.base import EngineInfo
from service.engines.fake import FakeEngine
from service.labelling.labeller import Labeller, softmax
from service.labelling.long_documents import MARKER, chars_covered, combine, model_texts, windows
from service.labelling.prompts import load_template
from service.labelling.scoring import annotate_texts, engine_scorer
from service.store import Store
from service.store.annotations import annotation_row
from service.taxonomy import load_taxonomy

MODES = ("truncate", "reject", "head_tail", "chunk")
WORDS = "".join(f"w{i:03d} " for i in range(400))  # 2,000 characters, a space at every 5th position
TAXONOMY = load_taxonomy(REPO / "taxonomy" / "sms-spam.yaml")


def _labeller(mode: str | None = None, budget: int = 100, **kwargs) -> Labeller:
    """An sms-spam labeller on the fake engine reading ``budget`` characters per request."""
    return Labeller(TAXONOMY, "v", load_template("classify"), FakeEngine().info, budget, long_documents=mode, **kwargs)


def test_windows_overlap_end_at_whitespace_and_cover_every_character():
    """Budget 100, overlap 10: each window ends after a space and the next starts 10 back, after a space."""
    spans = windows(WORDS[:500], 100)
    assert spans[:3] == [(0, 100), (90, 190), (180, 280)]
    for (start, stop), (next_start, _) in pairwise(spans):
        assert stop - start <= 100 and WORDS[stop - 1] == " " and WORDS[next_start - 1] == " "
        assert next_start < stop  # neighbours share characters
    covered = {i for start, stop in spans for i in range(start, stop)}
    assert covered == set(range(500)) and chars_covered(spans) == 500 and spans[-1][1] == 500


def test_windows_cut_mid_word_only_where_there_is_no_whitespace():
    """Without whitespace a window is exactly the budget and the next starts exactly the overlap back."""
    assert windows("x" * 250, 100) == [(0, 100), (90, 190), (180, 250)]
    shifted = "xx" + WORDS[:300]  # spaces at 6, 11, ...: the first window ends at 97, not 100
    assert windows(shifted, 100)[:2] == [(0, 97), (87, 187)]


def test_windows_beyond_the_cap_are_spread_evenly_and_the_rest_is_not_seen():
    """Eleven windows over 1,000 characters, cap 3: the first, the middle and the last; 300 characters seen."""
    assert len(windows("x" * 1000, 100, max_windows=100)) == 11
    spans = windows("x" * 1000, 100, max_windows=3)
    assert spans == [(0, 100), (450, 550), (900, 1000)] and chars_covered(spans) == 300


def test_head_tail_joins_two_thirds_of_the_head_and_a_third_of_the_tail():
    """Budget 62: head 41 cut back to 40 (after a space), tail 21 from 179 moved on to 180; 60 characters seen."""
    text = WORDS[:200]
    (seen_text,), chars_seen = model_texts(text, "head_tail", 62)
    assert seen_text == text[:40] + MARKER + text[180:] and chars_seen == 60
    (plain,), chars = model_texts("x" * 100, "head_tail", 30)
    assert plain == "x" * 20 + MARKER + "x" * 10 and chars == 30


@pytest.mark.parametrize("mode", MODES)
def test_a_text_within_the_budget_is_read_whole_in_every_mode(mode):
    """Same requests and same key-independent output: short texts never change behaviour."""
    text = WORDS[:100]
    assert model_texts(text, mode, 100) == ([text], 100)
    assert _labeller(mode).requests(text) == _labeller().requests(text)


def test_combine_is_the_mean_of_log_probabilities_a_product_of_experts():
    """softmax(mean) is the normalised geometric mean of the windows' distributions; one window is unchanged."""
    first, second = [math.log(0.8), math.log(0.2)], [math.log(0.4), math.log(0.6)]
    combined = softmax(combine([first, second]))
    geometric = [math.sqrt(0.8 * 0.4), math.sqrt(0.2 * 0.6)]
    assert combined == pytest.approx([g / sum(geometric) for g in geometric])
    assert combine([first]) == first
    with pytest.raises(ValueError, match="different numbers of scores"):
        combine([first, [0.0]])


def test_the_annotator_key_changes_with_how_long_texts_are_read():
    """truncate and reject read the head (the key from before the modes); head_tail, chunk and the cap differ."""
    keys = {mode: _labeller(mode).key for mode in MODES}
    assert keys["truncate"] == keys["reject"] == _labeller().key
    assert "long_documents" not in _labeller("truncate").spec
    assert len({keys["truncate"], keys["head_tail"], keys["chunk"]}) == 3
    assert _labeller("chunk", max_windows=4).key != keys["chunk"]


def test_chars_seen_and_truncated_per_mode_with_all_windows_in_one_engine_call():
    """A short text, and 500 characters at budget 100 in each mode; chunk sends every window in one call."""
    engine = FakeEngine()
    short, long = "win a free prize", WORDS[:500]
    seen = {}
    for mode in ("truncate", "head_tail", "chunk"):
        engine.calls = 0
        annotations = asyncio.run(annotate_texts(_labeller(mode), [short, long], engine_scorer(engine)))
        assert engine.calls == 1 and annotations[0].chars_seen == len(short) and not annotations[0].truncated
        seen[mode] = (annotations[1].chars_seen, annotations[1].truncated)
    assert seen == {"truncate": (100, True), "head_tail": (99, True), "chunk": (500, False)}  # head 65 + tail 34
    capped = asyncio.run(annotate_texts(_labeller("chunk", max_windows=2), [long], engine_scorer(engine)))[0]
    assert (capped.chars_seen, capped.truncated) == (150, True)  # six windows thinned to (0, 100), (450, 500)


def test_one_failing_window_fails_its_document_only():
    """The fake engine fails on FAIL_ENGINE in any window: that document fails, the other is labelled."""
    failing = WORDS[:300] + "FAIL_ENGINE " + WORDS[:100]
    annotations = asyncio.run(annotate_texts(_labeller("chunk"), [failing, WORDS[:300]], engine_scorer(FakeEngine())))
    assert annotations[0].status == "failed" and "fake engine failure" in annotations[0].error
    assert (annotations[1].status, annotations[1].chars_seen) == ("ok", 300)


def test_an_older_database_gains_chars_seen_and_caches_it(tmp_path):
    """A store without the column (and with its index, as before) migrates on open; the value round-trips."""
    store = Store(tmp_path / "db.duckdb", export_dir=tmp_path / "exports")
    store.cursor().execute("DROP INDEX annotations_by_text; ALTER TABLE annotations DROP COLUMN chars_seen;"
                           " CREATE INDEX annotations_by_text ON annotations (text_hash)")
    store.close()
    store = Store(tmp_path / "db.duckdb", export_dir=tmp_path / "exports")
    annotation = asyncio.run(annotate_texts(_labeller("chunk"), [WORDS[:300]], engine_scorer(FakeEngine())))[0]
    info = EngineInfo("fake", "word-overlap", {})
    store.annotations.write([annotation_row(annotation, job_id="j", doc_id="d", annotator="a", text_hash="h",
                                            cached=False, latency_ms=0.0, model=info.model, engine=info.engine,
                                            prompt_hash=None, taxonomy_version="v", decoding="{}")])
    assert store.annotations.cached("a", ["h"])["h"].chars_seen == 300
    store.close()


def test_a_job_overrides_the_taxonomy_and_reject_stays_stream_only(in_process):
    """sms-spam truncates; a job asking head_tail or chunk reads more, one asking reject is refused its long text.

    The LLM labels alone: the default panel's embedding annotator reads the whole text whatever the mode.
    """
    client, long = in_process.client, "Call me when you land. " * 100  # 2,300 characters
    documents = [{"id": "long", "text": long}]
    seen = {}
    for mode in ("head_tail", "chunk"):
        created = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents, "long_documents": mode,
                                                "annotators": [{"kind": "llm"}]})
        job_id = created.json()["job_id"]
        assert wait_for_job(client, job_id, timeout_s=60)["status"] == "succeeded"
        seen[mode] = sql(client, f"SELECT chars_seen, truncated FROM labels WHERE job_id = '{job_id}'")[0]
    assert seen["chunk"] == {"chars_seen": 2300, "truncated": False}
    assert seen["head_tail"]["truncated"] and 1800 < seen["head_tail"]["chars_seen"] <= 2000
    refused = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents, "long_documents": "reject"})
    assert refused.status_code == 413 and "the job says long_documents: reject" in refused.json()["error"]["message"]
    (in_process.settings.input_dir / "a.jsonl").write_text('{"text": "hi"}\n')
    batch = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "source": "a.jsonl", "mode": "batch",
                                          "long_documents": "reject"})
    assert batch.status_code == 422 and "mode 'stream'" in batch.json()["error"]["message"]
