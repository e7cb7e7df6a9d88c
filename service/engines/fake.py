"""A deterministic stand-in engine for plumbing tests and failure injection (no model).

It scores a continuation by how many of its words occur in the prompt's user text, so
results are predictable. A user text containing ``FAIL_ENGINE`` raises (a failing
document); one containing ``MALFORMED_OUTPUT`` returns too few scores. Never use it to
claim labelling quality: the end-to-end tests use the embedded model.
"""

from __future__ import annotations

import asyncio
import re

from service.engines.base import EngineInfo, ScoreRequest
from service.errors import EngineError

_WORD = re.compile(r"[a-z0-9]+")


class FakeEngine:
    """Word-overlap scorer with failure triggers."""

    def __init__(self, *, delay_s: float = 0.0):
        self.delay_s = delay_s  # simulated compute per document, one batch at a time (like one accelerator)
        self._device: asyncio.Lock | None = None
        self.calls = 0
        self.info = EngineInfo(engine="fake", model="word-overlap", decoding={"method": "word-overlap"})

    async def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Score every request; raise for the whole batch when one asks to fail."""
        self.calls += 1
        if self.delay_s:
            self._device = self._device or asyncio.Lock()
            async with self._device:
                await asyncio.sleep(self.delay_s * len(requests))
        if any("FAIL_ENGINE" in r.user for r in requests):
            raise EngineError("fake engine failure requested by the document")
        return [self._score_one(r) for r in requests]

    async def generate_json(self, system: str, user: str, schema: dict, *, max_tokens: int = 256) -> dict:
        """Every string property filled from the user text's most frequent words (enums: the first value)."""
        words = [w for w in _WORD.findall(user.lower()) if len(w) > 3]
        common = sorted(set(words), key=lambda w: (-words.count(w), w))[:2] or ["text"]
        return {name: spec["enum"][0] if "enum" in spec else " ".join(common)
                for name, spec in schema.get("properties", {}).items()}

    def _score_one(self, request: ScoreRequest) -> list[float]:
        """Log-score per continuation from word overlap with the user text."""
        words = set(_WORD.findall(request.user.lower()))
        scores = [float(len(words & set(_WORD.findall(c.lower())))) - 1.0 for c in request.continuations]
        return scores[:-1] if "MALFORMED_OUTPUT" in request.user else scores
