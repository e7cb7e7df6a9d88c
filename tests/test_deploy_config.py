"""deploy/serve-cpu.yaml is a valid Serve config whose import path builds the application."""

from __future__ import annotations

import yaml
from ray.serve.schema import ServeDeploySchema

from conftest import REPO
from service.app import build


def test_serve_cpu_config_parses_and_builds():
    """The config validates against Serve's schema and its builder returns an Application."""
    config = yaml.safe_load((REPO / "deploy" / "serve-cpu.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app_config = schema.applications[0]
    assert app_config.import_path == "service.app:build"
    application = build(app_config.args)
    assert type(application).__name__ == "Application"
    assert {d.name for d in app_config.deployments} == {"Ingress", "ModelServer"}
