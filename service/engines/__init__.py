"""Engine backends behind one protocol (``base.Engine``), named in the models config (``registry``)."""

from __future__ import annotations

from service.engines.base import Engine, EngineInfo, Reader, ScoreRequest
from service.engines.registry import ModelsConfig, ModelSpec, create_engine, load_models

__all__ = ["Engine", "EngineInfo", "ModelSpec", "ModelsConfig", "Reader", "ScoreRequest", "create_engine", "load_models"]
