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


@dataclass(frozen=True)
class ScoreRequest:
    """One document's prompt and the continuations to score after it."""

    system: str
    user: str
    continuations: tuple[str, ...]


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
