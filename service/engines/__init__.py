"""Engine backends behind one protocol (``base.Engine``), named in the models config (``registry``)."""

from __future__ import annotations

from .base import Engine, EngineInfo, ScoreRequest
from .registry import ModelsConfig, ModelSpec, create_engine, load_models

__all__ = ["Engine", "EngineInfo", "ModelSpec", "ModelsConfig", "ScoreRequest", "create_engine", "load_models"]
