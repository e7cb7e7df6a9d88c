"""The OpenAI-compatible engine against a real server nobody here wrote: llama-cpp-python's.

The server (started by the ``llama_server`` fixture on a loopback port) serves the same
SmolLM2-135M-Instruct GGUF the embedded engine converts, so both engines see the same
weights and the same chat prompt; they differ in numerics (llama.cpp's Q4_1 kernels vs
bf16 transformers) and, in ``top_logprobs`` mode, in reading each label's tokens from
the server's top-k lists. Hence "nearly all" top labels must agree, not all.
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer

import pytest
from conftest import FIXTURES, UpstreamProxy, free_port, run_engine, sql, wait_for_job

from service.engines.base import ScoreRequest
from service.engines.openai import OpenAIEngine
from service.engines.registry import ModelSpec
from service.errors import EngineUnavailable

AGREEMENT_DOCS = 10  # every message of the fixture
REQUIRED_AGREEMENT = 9  # of 10: both engines run the same weights; a near-tie may flip between numerics


def _engine(url: str, **options) -> OpenAIEngine:
    """An engine for the server at ``url`` serving 'smollm2'."""
    return OpenAIEngine(ModelSpec(engine="openai", base_url=url, model="smollm2", **options))


def test_server_engine_agrees_with_embedded_engine(service, labelled_taxonomy):
    """The same SMS messages labelled through the service by both engines: top labels agree on >= 9 of 10."""
    texts = [json.loads(line)["text"] for line in (FIXTURES / "sms.jsonl").read_text().splitlines()]
    documents = [{"id": f"a{i:02d}", "text": t} for i, t in enumerate(texts[:AGREEMENT_DOCS])]
    with service.client() as client:
        jobs = {model: client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": documents,
                                                     "model": model}).json()["job_id"]
                for model in ("smollm2", "llama")}
        finished = {model: wait_for_job(client, job_id) for model, job_id in jobs.items()}
        pairs = sql(client, "SELECT e.doc_id, e.label AS embedded, s.label AS server, s.distribution AS dist"
                            f" FROM labels e JOIN labels s ON s.doc_id = e.doc_id AND s.job_id = '{jobs['llama']}'"
                            f" WHERE e.job_id = '{jobs['smollm2']}'")
        engines = sql(client, f"SELECT DISTINCT engine, model FROM annotations WHERE job_id = '{jobs['llama']}'")
        models = {m["name"]: m for m in client.get("/v1/models").json()}
    assert all(job["status"] == "succeeded" and job["done"] == AGREEMENT_DOCS for job in finished.values())
    assert engines == [{"engine": "openai", "model": "smollm2"}]
    agree = sum(p["embedded"] == p["server"] for p in pairs)
    assert agree >= REQUIRED_AGREEMENT, pairs
    assert len({round(max(p["dist"].values()), 3) for p in pairs}) > 1, "distributions must come from real scores"
    assert models["llama"]["stats"]["documents"] >= AGREEMENT_DOCS
    assert models["smollm2"]["stats"]["documents"] >= AGREEMENT_DOCS and models["smollm2"]["default"]


def test_echo_scores_equal_embedded_log_probabilities(llama_server):
    """echo scoring sums the prompt log-probabilities of each label: the same numbers as the embedded engine.

    Short prompt: llama-cpp-python sorts the whole vocabulary for every echoed token (about 70 ms each here).
    """
    from service.engines.embedded import EmbeddedEngine
    from service.settings import Settings

    request = ScoreRequest("Classify the text as ham or spam.", "WIN a FREE prize, call now!", ("ham", "spam"))
    engine = _engine(llama_server, scoring="echo")
    served = run_engine(engine, engine.score([request]))[0]
    embedded = EmbeddedEngine(Settings().models_dir).score_sync([request])[0]
    assert served == pytest.approx(embedded, abs=1.0)  # Q4_1 llama.cpp kernels vs the bf16 copy of the same weights
    assert (served[0] > served[1]) == (embedded[0] > embedded[1])


def test_json_generation_follows_the_schema(llama_server):
    """Free-form output is constrained by the JSON schema (llama.cpp takes it as json_object + schema)."""
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": ["ham", "spam"]},
                                               "reason": {"type": "string", "maxLength": 40}},
              "required": ["label", "reason"]}
    engine = _engine(llama_server)
    reply = run_engine(engine, engine.generate_json("Classify the message.", "Message: WIN a FREE prize now!", schema,
                                                    max_tokens=64))
    assert reply["label"] in ("ham", "spam") and isinstance(reply["reason"], str)


def test_unreachable_server_is_a_clear_error():
    """No server on the port: the error names the URL and the failure after the retries."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = _engine(url, max_retries=1, timeout_s=5)
    with pytest.raises(EngineUnavailable, match=r"127\.0\.0\.1.*/completions: ConnectError"):
        run_engine(engine, engine.score([ScoreRequest("s", "u", ("a", "b"))]))


class _Flaky(UpstreamProxy):
    """Answers 429 (Retry-After: 0) to the first two requests, then forwards to the real server."""

    seen = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).seen += 1
        if type(self).seen <= 2:
            self.reply(429, b"", {"retry-after": "0"})
            return
        self.reply(*self.forward(body))


def test_rate_limited_requests_are_retried(llama_server):
    """Two 429 answers in front of the real server are retried; the scores arrive."""
    _Flaky.upstream, _Flaky.seen = llama_server, 0
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        engine = _engine(f"http://127.0.0.1:{proxy.server_port}/v1", scoring="top_logprobs", max_concurrency=1)
        scores = run_engine(engine, engine.score([ScoreRequest("Answer yes or no.", "Is water wet?", ("yes", "no"))]))[0]
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert _Flaky.seen > 2 and len(scores) == 2 and all(s < 0 for s in scores)


def test_plain_text_prompts_are_refused_by_name():
    """Completion-format templates are the embedded engine's: a server model refuses them clearly, before any request."""
    from service.errors import InvalidInput

    request = ScoreRequest("Classify.", "Text: hi\nLabel:", (" ham\n", " spam\n"), chat=False)
    with pytest.raises(InvalidInput, match="embedded engine only"):
        engine = _engine("http://127.0.0.1:9/v1")
        run_engine(engine, engine.score([request]))
