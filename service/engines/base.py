"""The engine protocol: every backend scores continuations of a chat prompt.

An engine answers one question (and, for taxonomy induction, writes JSON under a
schema): given a chat prompt (a ``system`` message shared by
many documents and a per-document ``user`` message), how likely is each candidate
continuation of the assistant's reply? Labelling turns those log-probabilities into
distributions; an engine knows nothing of taxonomies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

EMBEDDED_ENGINE = "embedded-transformers"  # the engine name of the in-process model (the only one scoring plain text)


@dataclass(frozen=True)
class ScoreRequest:
    """One document's prompt and the continuations to score after it.

    ``chat``: the prompt is the model's chat markup around ``system`` and ``user``, and each
    continuation is the assistant's reply up to its end-of-turn token. Without it the
    prompt is plain text, ``system`` then a blank line then ``user``, and each continuation
    is scored exactly as given (so it carries its own terminator, e.g. a newline).
    """

    system: str
    user: str
    continuations: tuple[str, ...]
    chat: bool = True


@dataclass(frozen=True)
class EngineInfo:
    """What identifies an engine's outputs, recorded on every annotation."""

    engine: str
    model: str
    decoding: dict = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A backend that returns the total log-probability of each continuation."""

    info: EngineInfo

    async def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Log P(continuation | prompt) for every continuation of every request, in order."""
        ...

    async def generate_json(self, system: str, user: str, schema: dict, *, max_tokens: int = 256) -> dict:
        """A greedy reply to the chat prompt, constrained to the JSON schema, parsed (taxonomy induction)."""
        ...


@runtime_checkable
class Reader(Protocol):
    """An engine that can also say how its model reads a prompt: its hidden states (the refinement's other views)."""

    async def read(self, requests: list[ScoreRequest]) -> list[list[list[float]]]:
        """For each request, in order, the same number of fixed-length vectors (``EmbeddedEngine.read_sync``)."""
        ...
