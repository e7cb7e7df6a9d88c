"""The manual under docs/ documents every setting, every HTTP route and every CLI command."""

from __future__ import annotations

import re

import typer
from conftest import REPO

PLACEHOLDER = re.compile(r"\{[^}]*\}")


def _manual() -> str:
    """The README and every docs page, placeholders such as ``{id}`` and ``{job_id}`` written alike."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return PLACEHOLDER.sub("{}", "\n".join(page.read_text(encoding="utf-8") for page in pages))


def test_every_setting_is_on_the_configuration_page():
    """A new ANNOTATE_* setting must reach docs/configuration.md (`annotate settings` prints the table)."""
    from service.settings import Settings

    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [f"ANNOTATE_{name.upper()}" for name in Settings.model_fields if f"`ANNOTATE_{name.upper()}`" not in page]
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_every_route_is_documented():
    """Each route path of the app (API, quality, classifiers, console, auth) appears in the manual."""
    from service.serve.http import declared_routes

    manual = _manual()
    paths = {PLACEHOLDER.sub("{}", route.path)
             for route in declared_routes()}
    missing = sorted(path for path in paths if path not in manual)
    assert not missing, f"routes missing from README.md and docs/: {missing}"


def test_every_cli_command_is_documented():
    """Each `annotate` command (and sub-command) appears in the manual as `annotate NAME`."""
    from service.cli.main import app

    manual = _manual()
    command = typer.main.get_command(app)
    names = []
    for name, sub in command.commands.items():
        names += [f"{name} {child}" for child in getattr(sub, "commands", {})] or [name]
    missing = sorted(name for name in names if f"annotate {name}" not in manual)
    assert not missing, f"CLI commands missing from README.md and docs/: {missing}"
