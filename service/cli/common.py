"""What every ``annotate`` command shares: the consoles, the service URL option and one HTTP call helper."""

from __future__ import annotations

import os
from typing import NoReturn

import httpx
import typer
from rich.console import Console

console = Console()
errors = Console(stderr=True)
URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="ANNOTATE_URL", help="Base URL of the service.")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error and exit non-zero."""
    errors.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def auth_headers() -> dict[str, str]:
    """The bearer header of ANNOTATE_TOKEN, when it is set."""
    token = os.environ.get("ANNOTATE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def call(method: str, url: str, **kwargs) -> httpx.Response:
    """An HTTP call (with ANNOTATE_TOKEN's bearer header) whose errors become one readable line."""
    headers = {**auth_headers(), **kwargs.pop("headers", {})}
    try:
        response = httpx.request(method, url, timeout=kwargs.pop("timeout", 60), headers=headers, **kwargs)
    except httpx.ConnectError:
        fail(f"no service answers at {url.split('/v1')[0]}; start one with `annotate serve`")
    if response.status_code >= 400:
        fail(f"{response.status_code}: {error_message(response)}")
    return response


def error_message(response: httpx.Response) -> str:
    """The service's error message, or the raw body when it is not our JSON shape."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text
