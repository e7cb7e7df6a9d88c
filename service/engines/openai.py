"""The OpenAI-compatible engine: scores labels through any server that speaks the OpenAI API.

vLLM, Ray Serve LLM and the llama.cpp server all qualify. The engine renders the chat
prompt itself (``chat_format``: the model's chat markup) and uses ``/v1/completions``,
the route that returns log-probabilities. Three scoring methods (``scoring``):

- ``auto`` (default): walk each document's label trie one token at a time. Each step is
  one prompt (the document's prompt plus the label tokens consumed so far) asking for
  ``max_tokens: 1`` with the top-k next-token log-probabilities; every step of a document
  shares the document's prompt as a prefix, so a server with prefix caching (vLLM's
  automatic prefix caching, llama.cpp's slot cache) computes the document once and each
  step adds a few tokens. A label token outside the top k is scored exactly by one
  ``echo`` request for that branch (the only request that recomputes the prompt); a
  server that refuses echo gets the k-th log-probability there, an upper bound, logged.
  The steps of one trie level go in one call as a list of prompts where the server takes
  lists (vLLM does; llama-cpp-python does not, detected once).
- ``top_logprobs``: the same walk, always with the bound (servers without prompt
  log-probabilities, such as OpenAI's API).
- ``echo``: one request per label, prompt + label + end-of-turn with ``echo: true`` and
  ``logprobs``, summing the label's prompt log-probabilities. Exact, but every request
  recomputes the whole prompt: vLLM sets ``skip_reading_prefix_cache`` for requests with
  prompt log-probabilities (vLLM 0.29, ``sampling_params.py``), so a 50-label taxonomy costs
  about 50 prefills of the document (``benchmarks/gpu_cost.py`` prints what that costs).

The engine counts the prompt tokens each document made the server compute
(``prefill``): the server's ``usage.prompt_tokens`` less ``prompt_tokens_details.cached_tokens``
where it reports them (vLLM with ``--enable-prompt-tokens-details``), else, for the walk,
the tokens beyond the document's prompt that each step adds (the prefix assumed cached).

Free-form output (taxonomy induction, rationales) goes through ``/v1/chat/completions``
with a JSON-schema ``response_format``. Requests share one pooled httpx client, at most
``max_concurrency`` in flight, and are retried with exponential backoff on 429, 5xx,
timeouts and dropped connections.

Size: about 420 lines on purpose: the three scoring methods share the trie walk, the
server-capability probes and the retry rules; apart they would repeat them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from dataclasses import dataclass

import httpx

from service.engines.base import EngineInfo, ScoreRequest
from service.engines.registry import ModelSpec
from service.errors import EngineError, EngineUnavailable, InvalidInput

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
FIRST_TOP_K = 5  # the OpenAI API's own limit; more only when a label's token is missing
UNSEEN_LOGPROB = -10.0  # a label step the server gave no log-probability for (it ended the turn instead)
BACKOFF_S = 0.5


@dataclass
class PrefillCount:
    """Documents scored and the prompt tokens they made the server compute (reported by ``GET /v1/models``)."""

    documents: int = 0
    tokens: int = 0

    def report(self) -> dict:
        """Plain JSON for the model's stats."""
        return {"prefill_tokens": self.tokens,
                "prefill_tokens_per_doc": round(self.tokens / self.documents, 1) if self.documents else 0.0}


@dataclass
class _Prefill:
    """One document's prefill: its prompt's token count (from the first answer) and the tokens computed."""

    document: int = 0
    tokens: int = 0

    def add(self, usage: dict | None, *, prompts: int, shared: int) -> None:
        """Count one answer: what the server says it computed, else its prompt tokens less ``shared`` per prompt."""
        usage = usage or {}
        total = int(usage.get("prompt_tokens") or 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if not self.document:
            self.document = total // max(prompts, 1)
            shared = 0
        self.tokens += total - int(cached) if cached is not None else max(total - prompts * shared, 0)


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
        if not (spec.base_url and spec.model):  # as ModelSpec checks for an openai model
            raise InvalidInput("an 'openai' model needs 'base_url' and 'model'")
        self.spec = spec
        self.base_url = spec.base_url.rstrip("/")
        self.chat = CHAT_FORMATS[spec.chat_format]
        self.scoring = spec.scoring
        self.info = EngineInfo(engine="openai", model=spec.model,
                               decoding={"method": f"continuation-logprob:{spec.scoring}", "chat_format": spec.chat_format,
                                         "top_logprobs": spec.top_logprobs})
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._lists: bool | None = None  # whether the server takes a list of prompts (None: not asked yet)
        self._echo_works: bool | None = None  # whether it gives prompt log-probabilities (None: not needed yet)
        self.prefill = PrefillCount()

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
        """Scores of one document's continuations by the configured method, counting the prefill it caused."""
        if not request.chat:  # llama-cpp-python's server echoed other log-probabilities than its own model here
            raise InvalidInput(f"model {self.spec.model!r}: plain-text (completion) prompt templates are scored by "
                               "the embedded engine only; choose a chat template such as 'classify'")
        prompt = self.chat.prompt(request.system, request.user)
        continuations = [c + self.chat.end for c in request.continuations]
        prefill = _Prefill()
        if self.scoring == "echo":
            scores = list(await asyncio.gather(*(self._echo(prompt, c, prefill) for c in continuations)))
        else:
            scores = await self._descend(prompt, continuations, prefill)
        self.prefill.documents += 1
        self.prefill.tokens += prefill.tokens
        return scores

    async def _echo(self, prompt: str, continuation: str, prefill: _Prefill) -> float:
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
        prefill.add(reply.get("usage"), prompts=1, shared=0)  # prompt log-probabilities bypass prefix caches
        generated = (reply.get("usage") or {}).get("completion_tokens", 1)  # echoed after the prompt's tokens
        cut = len(tokens) - generated
        return _tail_logprob(tokens[:cut], values[:cut], self.chat.visible(continuation), self.chat.specials)

    async def _descend(self, prompt: str, continuations: list[str], prefill: _Prefill) -> list[float]:
        """Score continuations token by token from top-k next-token log-probabilities, shared prefixes once."""
        scores = [0.0] * len(continuations)
        frontier: dict[str, list[int]] = {"": list(range(len(continuations)))}
        while frontier:
            steps = await self._steps(prompt, [(consumed, [continuations[m][len(consumed):] for m in members])
                                               for consumed, members in frontier.items()], prefill)
            deeper: dict[str, list[int]] = {}
            for (consumed, members), found in zip(frontier.items(), steps):
                for m, (logprob, step) in zip(members, found):
                    scores[m] += logprob
                    rest = continuations[m][len(consumed):]
                    if step and step < len(rest):
                        deeper.setdefault(consumed + rest[:step], []).append(m)
            frontier = deeper
        return scores

    async def _steps(self, prompt: str, level: list[tuple[str, list[str]]],
                     prefill: _Prefill) -> list[list[tuple[float, int]]]:
        """(log-probability, characters consumed) of each continuation's next token at one trie level; 0 ends it.

        Asks for a few top tokens first and for the configured top k only where a
        continuation's next token is not among them (llama.cpp renders every special
        token as "", so a short list keeps the end-of-turn marker unambiguous); a token
        outside the top k is scored exactly by echo where allowed (see the module docstring).
        """
        prompts = [prompt + consumed for consumed, _ in level]
        tops = await self._tops(prompts, min(FIRST_TOP_K, self.spec.top_logprobs), prefill)
        short = [i for i, (top, (_, rests)) in enumerate(zip(tops, level))
                 if top and any(self._next_token(rest, top) is None for rest in rests)]
        if short and self.spec.top_logprobs > FIRST_TOP_K:
            wider = await self._tops([prompts[i] for i in short], self.spec.top_logprobs, prefill)
            for i, top in zip(short, wider):
                tops[i] = {**top, **tops[i]}
        found = await asyncio.gather(*(self._found(prompts[i], rests, top, prefill)
                                       for i, (top, (_, rests)) in enumerate(zip(tops, level))))
        return list(found)

    async def _found(self, prompt: str, rests: list[str], top: dict[str, float],
                     prefill: _Prefill) -> list[tuple[float, int]]:
        """Each continuation's next step after ``prompt`` given the server's top-k list there (echoes in parallel)."""
        return list(await asyncio.gather(*(self._next_step(prompt, rest, top, prefill) for rest in rests)))

    async def _next_step(self, prompt: str, rest: str, top: dict[str, float], prefill: _Prefill) -> tuple[float, int]:
        """One continuation's (log-probability, characters consumed) after ``prompt``; 0 characters ends it."""
        if not top:  # greedy decoding ended the turn here: the end marker was the argmax
            return (0.0 if rest == self.chat.end else UNSEEN_LOGPROB), 0
        token = self._next_token(rest, top)
        if token is not None:
            return top[token], len(self.chat.end) if rest == self.chat.end else len(token)
        if self._echo_allowed():
            return await self._exact(prompt, rest, prefill, min(top.values())), 0
        return min(top.values()), 0  # not in the top k: at most the k-th, and stop here

    def _echo_allowed(self) -> bool:
        """Whether a label token outside the top k may be scored by echo (``auto``, until the server refuses it)."""
        return self.scoring == "auto" and self._echo_works is not False

    async def _exact(self, prompt: str, rest: str, prefill: _Prefill, bound: float) -> float:
        """The exact log-probability of ``rest`` after ``prompt`` by echo; the bound if the server refuses echo."""
        try:
            value = await self._echo(prompt, rest, prefill)
        except EchoRefused as exc:
            log.warning("server has no prompt log-probabilities; labels outside the top k get the k-th "
                        "log-probability (an upper bound)", extra={"base_url": self.base_url, "reason": str(exc)})
            self._echo_works = False
            return bound
        self._echo_works = True
        return value

    def _next_token(self, rest: str, top: dict[str, float]) -> str | None:
        """The top-k token that continues ``rest``: its longest match, or the end-of-turn marker.

        Servers render the end-of-turn token as its text or as nothing (llama.cpp), so at
        the end of a continuation both spellings count.
        """
        if rest == self.chat.end:
            return next((t for t in (self.chat.end, "") if t in top), None)
        return max((t for t in top if t and rest.startswith(t)), key=len, default=None)

    async def _tops(self, prompts: list[str], k: int, prefill: _Prefill) -> list[dict[str, float]]:
        """The server's top-k next tokens after each prompt ({} where it ended the turn), one call where it can.

        A list of prompts goes in one request if the server takes lists (asked once, without
        retries: llama-cpp-python answers 500 to a list longer than one); otherwise one
        request per prompt, in parallel.
        """
        body = {"model": self.spec.model, "max_tokens": 1, "temperature": 0, "logprobs": k}
        if len(prompts) > 1 and self._lists is not False:
            try:
                reply = await self._post("/completions", {**body, "prompt": prompts},
                                         retries=0 if self._lists is None else None)
                choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
                if len(choices) != len(prompts):
                    raise EngineError(f"{len(choices)} choices for {len(prompts)} prompts")
            except ServerUnreachable:
                raise
            except EngineError as exc:
                if self._lists:
                    raise
                log.info("server takes one prompt per completion request", extra={"base_url": self.base_url,
                                                                                   "reason": str(exc)[:200]})
                self._lists = False
            else:
                self._lists = True
                prefill.add(reply.get("usage"), prompts=len(prompts), shared=prefill.document)
                return [self._top_of(choice) for choice in choices]
        replies = await asyncio.gather(*(self._post("/completions", {**body, "prompt": p}) for p in prompts))
        tops = []
        for reply in replies:
            prefill.add(reply.get("usage"), prompts=1, shared=prefill.document)
            tops.append(self._top_of(reply["choices"][0]))
        return tops

    def _top_of(self, choice: dict) -> dict[str, float]:
        """The top-k next tokens of one completion choice ({} if the server ended the turn at once)."""
        top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
        if not top and choice.get("finish_reason") == "stop" and not choice.get("text"):
            return {}  # some servers (llama.cpp) report nothing when the first token is end-of-sequence
        if not top:
            raise EngineUnavailable(f"{self.base_url} returned no top log-probabilities; this engine needs "
                                    "a server that supports 'logprobs' on /v1/completions")
        return top

    async def _post(self, path: str, body: dict, *, retries: int | None = None) -> dict:
        """POST with bounded concurrency and retries (the model's ``max_retries`` unless given); errors name the
        server and what it said."""
        client, slots = self._connection()
        retries = self.spec.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            last = attempt == retries
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
        if self._client is None or self._slots is None:  # made together
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
