"""The OpenAI-compatible engine: scores labels through any server that speaks the OpenAI API.

vLLM, Ray Serve LLM and the llama.cpp server all qualify. The engine renders the chat
prompt itself (``chat_format``: the model's chat markup) and uses ``/v1/completions``,
because only the completions route returns log-probabilities of prompt tokens:

- ``echo`` scoring sends prompt + label + end-of-turn with ``echo: true, logprobs``
  and sums the log-probabilities of the label's tokens: exactly what the embedded
  engine computes, one request per label (servers reuse the shared prefix through
  prefix caching);
- ``top_logprobs`` scoring, for servers without prompt log-probabilities (or, like
  llama-cpp-python, slow to compute them: it sorts the whole vocabulary for every
  prompt token), asks for the top-k next-token log-probabilities and walks each label
  token by token down to its end-of-turn marker, shared prefixes once (one short
  request per step; servers reuse the cached prompt). A label whose next token is not
  in the top k gets the k-th log-probability, an upper bound, and stops there. Only
  log-probabilities are read, never sampled text, so no output constraint is needed;
- ``auto`` tries echo and falls back to top_logprobs for good when the server refuses
  it (a 4xx, or an answer without prompt log-probabilities); outages are errors, never
  a reason to switch.

Free-form output (taxonomy induction, rationales) goes through ``/v1/chat/completions``
with a JSON-schema ``response_format``. Requests share one pooled httpx client, at most
``max_concurrency`` in flight, and are retried with exponential backoff on 429, 5xx,
timeouts and dropped connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from dataclasses import dataclass

import httpx

from ..errors import EngineError, EngineUnavailable, InvalidInput
from .base import EngineInfo, ScoreRequest
from .registry import ModelSpec

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
FIRST_TOP_K = 5  # the OpenAI API's own limit; more only when a label's token is missing
UNSEEN_LOGPROB = -10.0  # a label step the server gave no log-probability for (it ended the turn instead)
BACKOFF_S = 0.5


class ServerUnreachable(EngineUnavailable):
    """No answer at all (connection refused, timeouts) after every retry."""


class EchoRefused(EngineUnavailable):
    """The server answered but will not give prompt log-probabilities (``auto`` then reads top-k lists)."""


@dataclass(frozen=True)
class ChatFormat:
    """A model family's chat markup: the prompt up to the assistant's reply, and the end of a turn."""

    template: str  # with {system} and {user}
    end: str
    specials: tuple[str, ...]  # markup a document may not contain (it could forge turns)

    def prompt(self, system: str, user: str) -> str:
        """The completion prompt that ends where the assistant's reply starts."""
        return self.template.format(system=system, user=self.visible(user))

    def visible(self, text: str) -> str:
        """``text`` without this format's markup (documents cannot forge turns; scoring compares plain text)."""
        return _strip(text, self.specials)


CHAT_FORMATS = {
    "chatml": ChatFormat(  # SmolLM2, Qwen2/2.5, Hermes, many others
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>", ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    "llama3": ChatFormat(  # the server adds <|begin_of_text|> itself
        "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>")),
    "gemma": ChatFormat(
        "<start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n",
        "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    "mistral": ChatFormat("[INST] {system}\n\n{user} [/INST]", "</s>", ("[INST]", "[/INST]", "</s>")),
}


class OpenAIEngine:
    """Label scoring and JSON generation against an OpenAI-compatible server."""

    def __init__(self, spec: ModelSpec):
        if spec.chat_format not in CHAT_FORMATS:
            raise InvalidInput(f"unknown chat_format {spec.chat_format!r}; choose one of {', '.join(CHAT_FORMATS)}")
        self.spec = spec
        self.base_url = spec.base_url.rstrip("/")
        self.chat = CHAT_FORMATS[spec.chat_format]
        self.scoring = spec.scoring
        self.info = EngineInfo(engine="openai", model=spec.model,
                               decoding={"method": f"continuation-logprob:{spec.scoring}", "chat_format": spec.chat_format,
                                         "top_logprobs": spec.top_logprobs})
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None

    async def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Log-probability of each continuation of each request, requests in parallel."""
        return list(await asyncio.gather(*(self._score_one(r) for r in requests)))

    async def generate_json(self, system: str, user: str, schema: dict, *, max_tokens: int = 512) -> dict:
        """A reply constrained to a JSON schema (greedy), parsed.

        Asks in the OpenAI form (``json_schema``, as vLLM takes it) and, if the server
        answers with an error, in the llama.cpp form (``json_object`` with a ``schema``);
        an unreachable server is an error at once.
        """
        body = {"model": self.spec.model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        formats = self._json_formats(schema)
        for response_format in formats:
            try:
                reply = await self._post("/chat/completions", {**body, "response_format": response_format})
            except ServerUnreachable:
                raise
            except EngineError:  # an error answer (llama-cpp-python says 500): it may want its own form
                if response_format is formats[-1]:
                    raise
                continue
            content = reply["choices"][0]["message"]["content"]
            try:
                return json.loads(content)
            except json.JSONDecodeError as exc:
                raise EngineError(f"{self.base_url} returned output that is not the requested JSON: "
                                  f"{content[:200]!r}") from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _json_formats(schema: dict) -> list[dict]:
        """The ways servers accept a JSON-schema constraint, the standard one first."""
        return [{"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}},
                {"type": "json_object", "schema": schema}]

    async def close(self) -> None:
        """Release pooled connections."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _score_one(self, request: ScoreRequest) -> list[float]:
        """Scores of one document's continuations by the configured (or detected) method."""
        if not request.chat:  # llama-cpp-python's server echoed other log-probabilities than its own model here
            raise InvalidInput(f"model {self.spec.model!r}: plain-text (completion) prompt templates are scored by "
                               "the embedded engine only; choose a chat template such as 'classify'")
        prompt = self.chat.prompt(request.system, request.user)
        if self.scoring == "top_logprobs":
            return await self._descend(prompt, [c + self.chat.end for c in request.continuations])
        try:
            return list(await asyncio.gather(*(self._echo(prompt, c + self.chat.end) for c in request.continuations)))
        except EchoRefused:
            if self.scoring == "echo":
                raise
            log.warning("server has no prompt log-probabilities; scoring by top log-probabilities",
                        extra={"base_url": self.base_url})
            self.scoring = "top_logprobs"
            return await self._score_one(request)

    async def _echo(self, prompt: str, continuation: str) -> float:
        """Sum of the prompt log-probabilities of the tokens that spell ``continuation``."""
        body = {"model": self.spec.model, "prompt": prompt + continuation, "max_tokens": 1, "temperature": 0,
                "echo": True, "logprobs": 1}
        try:
            reply = await self._post("/completions", body)
        except EngineUnavailable:  # unreachable, overloaded, no such route: not a refusal of echo
            raise
        except EngineError as exc:  # the server answered 4xx to this request
            raise EchoRefused(f"{self.base_url} refused echo with logprobs ({exc}); "
                              "set scoring: top_logprobs for this model") from exc
        logprobs = reply["choices"][0].get("logprobs") or {}
        tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if not tokens or not values or len(tokens) != len(values):
            raise EchoRefused(f"{self.base_url} returned no prompt log-probabilities for echo=true; "
                              "set scoring: top_logprobs for this model")
        generated = (reply.get("usage") or {}).get("completion_tokens", 1)  # echoed after the prompt's tokens
        cut = len(tokens) - generated
        return _tail_logprob(tokens[:cut], values[:cut], self.chat.visible(continuation), self.chat.specials)

    async def _descend(self, prompt: str, continuations: list[str]) -> list[float]:
        """Score continuations token by token from top-k next-token log-probabilities, shared prefixes once."""
        scores = [0.0] * len(continuations)
        frontier: dict[str, list[int]] = {"": list(range(len(continuations)))}
        while frontier:
            steps = await asyncio.gather(*(self._step(prompt + consumed, [continuations[m][len(consumed):] for m in members])
                                           for consumed, members in frontier.items()))
            deeper: dict[str, list[int]] = {}
            for (consumed, members), found in zip(frontier.items(), steps):
                for m, (logprob, step) in zip(members, found):
                    scores[m] += logprob
                    rest = continuations[m][len(consumed):]
                    if step and step < len(rest):
                        deeper.setdefault(consumed + rest[:step], []).append(m)
            frontier = deeper
        return scores

    async def _step(self, prompt: str, rests: list[str]) -> list[tuple[float, int]]:
        """(log-probability, characters consumed) of each continuation's next token; 0 characters ends it.

        Asks for a few top tokens first and for the configured top k only if a
        continuation's next token is not among them (llama.cpp renders every special
        token as "", so a short list keeps the end-of-turn marker unambiguous).
        """
        top = await self._top(prompt, min(FIRST_TOP_K, self.spec.top_logprobs))
        if top and any(self._next_token(rest, top) is None for rest in rests) and self.spec.top_logprobs > FIRST_TOP_K:
            top = {**await self._top(prompt, self.spec.top_logprobs), **top}
        found = []
        for rest in rests:
            if not top:  # greedy decoding ended the turn here: the end marker was the argmax
                found.append((0.0 if rest == self.chat.end else UNSEEN_LOGPROB, 0))
                continue
            token = self._next_token(rest, top)
            if token is None:
                found.append((min(top.values()), 0))  # not in the top k: at most the k-th, and stop here
            else:
                found.append((top[token], len(self.chat.end) if rest == self.chat.end else len(token)))
        return found

    def _next_token(self, rest: str, top: dict[str, float]) -> str | None:
        """The top-k token that continues ``rest``: its longest match, or the end-of-turn marker.

        Servers render the end-of-turn token as its text or as nothing (llama.cpp), so at
        the end of a continuation both spellings count.
        """
        if rest == self.chat.end:
            return next((t for t in (self.chat.end, "") if t in top), None)
        return max((t for t in top if t and rest.startswith(t)), key=len, default=None)

    async def _top(self, prompt: str, k: int) -> dict[str, float]:
        """The server's top-k next tokens after ``prompt`` with their log-probabilities ({} if it ended the turn)."""
        body = {"model": self.spec.model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "logprobs": k}
        reply = await self._post("/completions", body)
        choice = reply["choices"][0]
        top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
        if not top and choice.get("finish_reason") == "stop" and not choice.get("text"):
            return {}  # some servers (llama.cpp) report nothing when the first token is end-of-sequence
        if not top:
            raise EngineUnavailable(f"{self.base_url} returned no top log-probabilities; this engine needs "
                                    "a server that supports 'logprobs' on /v1/completions")
        return top

    async def _post(self, path: str, body: dict) -> dict:
        """POST with bounded concurrency and retries; errors name the server and what it said."""
        client, slots = self._connection()
        for attempt in range(self.spec.max_retries + 1):
            last = attempt == self.spec.max_retries
            try:
                async with slots:
                    response = await client.post(path, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if last:
                    raise ServerUnreachable(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(_backoff(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and not last:
                await asyncio.sleep(_backoff(attempt, response.headers.get("retry-after")))
                continue
            if response.status_code == 404:
                raise EngineUnavailable(f"{self.base_url}{path} not found (404): the server must offer the "
                                        f"OpenAI '{path}' route and serve model {self.spec.model!r}")
            if response.status_code in RETRY_STATUS:
                raise EngineUnavailable(f"{self.base_url}{path}: HTTP {response.status_code} after "
                                        f"{attempt + 1} attempts: {response.text[:300]}")
            if response.status_code >= 400:
                raise EngineError(f"{self.base_url}{path}: HTTP {response.status_code}: {response.text[:300]}")
            return response.json()
        raise AssertionError("unreachable")

    def _connection(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """The pooled client and the concurrency gate, made in the event loop that uses them."""
        if self._client is None:
            key = os.environ.get(self.spec.api_key_env, "") if self.spec.api_key_env else ""
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            limits = httpx.Limits(max_connections=self.spec.max_concurrency,
                                  max_keepalive_connections=self.spec.max_concurrency)
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits,
                                             timeout=self.spec.timeout_s)
            self._slots = asyncio.Semaphore(self.spec.max_concurrency)
        return self._client, self._slots


def _tail_logprob(tokens: list[str], values: list[float | None], visible: str, specials: tuple[str, ...]) -> float:
    """Sum the log-probabilities of the last prompt tokens, back until they spell ``visible``.

    Servers render chat markup tokens either as their text or as nothing (llama.cpp), so
    the walk compares only the text outside markup; the markup token that ends the
    continuation is included either way.
    """
    total, spelled = 0.0, ""
    for token, value in zip(reversed(tokens), reversed(values)):
        if value is None:
            raise EngineError("the continuation reaches the first prompt token, which has no log-probability")
        total += value
        spelled = _strip(token, specials) + spelled
        if len(spelled) >= len(visible):
            return total
    raise EngineError(f"echoed tokens spell {spelled!r}, shorter than the continuation {visible!r}")


def _strip(text: str, specials: tuple[str, ...]) -> str:
    """``text`` without chat markup."""
    for special in specials:
        text = text.replace(special, "")
    return text


def _backoff(attempt: int, retry_after: str | None) -> float:
    """Seconds before the next try: the server's Retry-After if given, else exponential with jitter."""
    if retry_after and retry_after.replace(".", "", 1).isdigit():
        return min(float(retry_after), 30.0)
    return BACKOFF_S * 2 ** attempt * (0.5 + random.random())
