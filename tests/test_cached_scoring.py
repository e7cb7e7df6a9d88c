"""Scoring over an OpenAI-compatible server that keeps the prefix cache (``scoring: auto``).

Two servers: the real llama.cpp server (llama-cpp-python, the SmolLM2 GGUF), whose log
says how many prompt tokens it evaluated for each request, and, because vLLM cannot run
here (it needs a GPU), a stand-in that answers in vLLM 0.29's response shapes
(``CompletionResponse`` in ``vllm/entrypoints/openai/completion/protocol.py``: choices
with ``index`` for a list of prompts, ``logprobs.top_logprobs``, echoed prompt tokens whose
first log-probability is null, ``usage.prompt_tokens_details.cached_tokens``) from a toy
character-level model whose exact label log-probabilities the test computes itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import FIXTURES, run_engine, running_llama_server

from service.engines.base import ScoreRequest
from service.engines.openai import OpenAIEngine
from service.engines.registry import ModelSpec

PREFILL_SLACK = 1.2  # the bound: at most (document + labels) x 1.2 prompt tokens computed per document
LABELS = ("sports", "spam", "space", "science", "politics", "poetry")


def _engine(url: str, **options) -> OpenAIEngine:
    """An engine for the server at ``url`` serving 'smollm2'."""
    return OpenAIEngine(ModelSpec(engine="openai", base_url=url, model="smollm2", **options))


@pytest.fixture(scope="module")
def logged_llama_server(tmp_path_factory):
    """A llama.cpp server of this module's own, so its log holds only this module's requests: (URL, log path)."""
    log = tmp_path_factory.mktemp("llama-logged") / "server.log"
    with running_llama_server(log) as url:
        yield url, log


def _evaluated(log_text: str) -> int:
    """Prompt tokens llama.cpp evaluated, summed over the requests in ``log_text`` (its per-request perf lines)."""
    return sum(int(n) for n in re.findall(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", log_text))


def test_cached_scoring_computes_each_document_about_once(logged_llama_server):
    """Real llama.cpp: a document with six labels costs at most (document + labels) x 1.2 prompt tokens.

    Counted by the server (its log): echo would cost six prompts' worth; the walk reuses the
    document's prompt for every step, and the echo requests for label tokens outside the
    top k reuse it too on llama.cpp. The engine's own count assumes, as on vLLM, that those
    echo requests recompute their prompt, so it bounds the server's from above.
    """
    from transformers import AutoTokenizer

    from service.engines.embedded import fetch_model
    from service.settings import Settings

    url, log = logged_llama_server
    tokenizer = AutoTokenizer.from_pretrained(fetch_model(Settings().models_dir))
    engine = _engine(url, scoring="auto", top_logprobs=1000, max_concurrency=1)
    system = "Classify the message into one topic: " + ", ".join(LABELS) + "."
    texts = [json.loads(line)["text"] for line in (FIXTURES / "sms.jsonl").read_text().splitlines()][:2]
    labels = sum(len(tokenizer(label + engine.chat.end, add_special_tokens=False)["input_ids"]) for label in LABELS)

    async def one_at_a_time() -> list[tuple[int, list[float], int, int]]:
        """(document tokens, scores, tokens the server evaluated, tokens the engine counted) per document."""
        measured = []
        for text in texts:
            before, counted = len(log.read_text()), engine.prefill.tokens
            scores = (await engine.score([ScoreRequest(system, text, LABELS)]))[0]
            document = len(tokenizer(engine.chat.prompt(system, text), add_special_tokens=False)["input_ids"])
            measured.append((document, scores, _evaluated(log.read_text()[before:]), engine.prefill.tokens - counted))
        await engine.close()
        return measured

    for document, scores, by_server, by_engine in asyncio.run(one_at_a_time()):
        assert len(scores) == len(LABELS) and all(s < 0 for s in scores)
        assert 0 < by_server <= PREFILL_SLACK * (document + labels), (by_server, document, labels)
        assert by_engine >= by_server  # the engine's count is an upper bound: it assumes echo recomputes (vLLM)


# --- a stand-in answering in vLLM's shapes ------------------------------------------------------------------

SPECIALS = ("<|im_start|>", "<|im_end|>")
VOCABULARY = tuple("abcdefghijklmnopqrstuvwxyz \n") + SPECIALS
LABEL_LETTERS = set("".join(LABELS)) | {"<|im_end|>"}


def _tokens(text: str) -> list[str]:
    """The toy tokenizer: chat markup as one token each, every other character a token."""
    return [t for part in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text) if part
            for t in ([part] if part in SPECIALS else list(part))]


def _logprobs(context: list[str]) -> dict[str, float]:
    """The toy model: next-token log-probabilities from a hash of the last two tokens, the labels' letters favoured."""
    key = "".join(context[-2:])
    raw = {t: 3 * int(hashlib.sha256(f"{key}|{t}".encode()).hexdigest()[:8], 16) / 16**8 + 3 * (t in LABEL_LETTERS)
           for t in VOCABULARY}
    norm = math.log(sum(math.exp(v) for v in raw.values()))
    return {t: v - norm for t, v in raw.items()}


def _exact(prompt: str, continuation: str) -> float:
    """The toy model's log-probability of ``continuation`` after ``prompt``."""
    context, total = _tokens(prompt), 0.0
    for token in _tokens(continuation):
        total += _logprobs(context)[token]
        context.append(token)
    return total


class _VllmShaped(BaseHTTPRequestHandler):
    """``/v1/completions`` in vLLM 0.29's shapes, with a prefix cache it reports as ``cached_tokens``."""

    seen: list[list[str]] = []
    calls: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).calls.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices, prompt_tokens, cached = [], 0, 0
        for index, prompt in enumerate(prompts):
            tokens = _tokens(prompt)
            if not body.get("echo"):  # prompt log-probabilities skip reading the prefix cache (vLLM 0.29)
                cached += max((_common(tokens, s) for s in self.seen), default=0)
            self.seen.append(tokens)
            prompt_tokens += len(tokens)
            choices.append(self._choice(index, prompt, tokens, body))
        random.shuffle(choices)  # vLLM orders by index; a client must not rely on list order
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(prompts),
                 "total_tokens": prompt_tokens + len(prompts), "prompt_tokens_details": {"cached_tokens": cached}}
        reply = {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": body["model"],
                 "choices": choices, "usage": usage}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @staticmethod
    def _choice(index: int, prompt: str, tokens: list[str], body: dict) -> dict:
        """One CompletionResponseChoice: the greedy next token with its top-k (and the echoed prompt)."""
        nxt = _logprobs(tokens)
        top = dict(sorted(nxt.items(), key=lambda kv: -kv[1])[: body["logprobs"]])
        chosen = max(nxt, key=nxt.get)
        logprobs = {"text_offset": [len(prompt)], "token_logprobs": [nxt[chosen]], "tokens": [chosen],
                    "top_logprobs": [top]}
        if body.get("echo"):
            prompt_values = [None] + [_logprobs(tokens[:i])[t] for i, t in enumerate(tokens) if i]
            offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
            logprobs = {"text_offset": offsets + logprobs["text_offset"],
                        "token_logprobs": prompt_values + logprobs["token_logprobs"],
                        "tokens": tokens + logprobs["tokens"],
                        "top_logprobs": [None] * len(tokens) + logprobs["top_logprobs"]}
        text = "" if chosen in SPECIALS else chosen
        return {"index": index, "text": (prompt if body.get("echo") else "") + text, "logprobs": logprobs,
                "finish_reason": "stop" if chosen in SPECIALS else "length", "stop_reason": None,
                "prompt_logprobs": None}

    def log_message(self, *args):
        """Quiet."""


def _common(a: list[str], b: list[str]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture()
def vllm_shaped():
    """The stand-in on loopback, its memory cleared; yields its /v1 URL."""
    _VllmShaped.seen, _VllmShaped.calls = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VllmShaped)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


REQUEST = ScoreRequest("pick a topic", "the match ended two to one", LABELS)


def _prompt(engine: OpenAIEngine) -> str:
    """The completion prompt the engine sends for ``REQUEST``."""
    return engine.chat.prompt(REQUEST.system, REQUEST.user)


def test_auto_scoring_is_exact_on_vllm_shapes(vllm_shaped):
    """Top-k walk in lists of prompts, echo only for tokens outside the top k: every label's exact log-probability."""
    engine = _engine(vllm_shaped, scoring="auto", top_logprobs=12)
    scores = run_engine(engine, engine.score([REQUEST]))[0]
    exact = [_exact(_prompt(engine), label + engine.chat.end) for label in LABELS]
    assert scores == pytest.approx(exact, abs=1e-9)
    assert any(isinstance(call["prompt"], list) and len(call["prompt"]) > 1 for call in _VllmShaped.calls)
    assert any(call.get("echo") for call in _VllmShaped.calls), "some label token must fall outside the top 12"


def test_bounded_and_echo_scoring_on_vllm_shapes(vllm_shaped):
    """``top_logprobs`` never echoes and bounds from above; ``echo`` is exact at one full prompt per label."""
    bounded = _engine(vllm_shaped, scoring="top_logprobs", top_logprobs=8)
    echo = _engine(vllm_shaped, scoring="echo")
    exact = [_exact(_prompt(echo), label + echo.chat.end) for label in LABELS]
    upper = run_engine(bounded, bounded.score([REQUEST]))[0]
    assert not any(call.get("echo") for call in _VllmShaped.calls)
    assert all(u >= e - 1e-9 for u, e in zip(upper, exact))
    assert run_engine(echo, echo.score([REQUEST]))[0] == pytest.approx(exact, abs=1e-9)


def test_prefill_counts_on_vllm_shapes(vllm_shaped):
    """The engine counts what the server computed: the walk about one document, echo one document per label."""
    walk, echo = _engine(vllm_shaped, scoring="top_logprobs", top_logprobs=8), _engine(vllm_shaped, scoring="echo")
    document = len(_tokens(_prompt(walk)))
    labels = sum(len(_tokens(label + walk.chat.end)) for label in LABELS)
    run_engine(walk, walk.score([REQUEST]))
    _VllmShaped.seen = []  # a cold cache for echo too (it never reads it anyway)
    run_engine(echo, echo.score([REQUEST]))
    assert document <= walk.prefill.tokens <= PREFILL_SLACK * (document + labels)
    assert echo.prefill.tokens >= len(LABELS) * document
    assert walk.prefill.report()["prefill_tokens_per_doc"] == walk.prefill.tokens
