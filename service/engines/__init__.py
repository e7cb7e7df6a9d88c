"""Engine backends behind one protocol (``base.Engine``); ``create_engine`` picks one by name."""

from __future__ import annotations

from ..errors import InvalidInput
from ..settings import Settings
from .base import Engine, EngineInfo, ScoreRequest

ENGINES = ("embedded", "fake")

__all__ = ["ENGINES", "Engine", "EngineInfo", "ScoreRequest", "create_engine"]


def create_engine(settings: Settings) -> Engine:
    """Build the configured engine; heavy imports happen only for the one chosen."""
    if settings.engine == "embedded":
        from .embedded import EmbeddedEngine

        return EmbeddedEngine(settings.models_dir, threads=settings.engine_threads)
    if settings.engine == "fake":
        from .fake import FakeEngine

        return FakeEngine()
    raise InvalidInput(f"unknown engine {settings.engine!r}; choose one of {', '.join(ENGINES)}")
