"""``annotate token``: create, list and revoke API tokens (needs an admin token in ANNOTATE_TOKEN)."""

from __future__ import annotations

import typer
from rich.table import Table

from service.cli.common import URL, call, console

token_app = typer.Typer(help="API tokens: create (shown once), list, revoke. Needs ANNOTATE_TOKEN with scope admin.",
                        no_args_is_help=True)


@token_app.command("create")
def token_create(name: str = typer.Argument(..., help="Who or what will hold the token."),
                 scope: str = typer.Option("read", "--scope", help="read < write < admin; each holds the ones below."),
                 url: str = URL) -> None:
    """Create a token and print it; this is the only time its secret is shown."""
    body = call("POST", f"{url}/v1/tokens", json={"name": name, "scope": scope}).json()
    console.print(f"token {body['token_id']} ({body['scope']}) for {body['name']}:", highlight=False)
    console.print(body["token"], highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list(url: str = URL) -> None:
    """Every token with its scope and whether it is revoked (never the secrets)."""
    table = Table("token_id", "name", "scope", "created_at", "revoked_at")
    for row in call("GET", f"{url}/v1/tokens").json():
        table.add_row(*[str(row[k] or "") for k in ("token_id", "name", "scope", "created_at", "revoked_at")])
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="The token's id (ann_<id>_…)."), url: str = URL) -> None:
    """Revoke a token at once."""
    row = call("DELETE", f"{url}/v1/tokens/{token_id}").json()
    console.print(f"token {row['token_id']} revoked at {row['revoked_at']}", highlight=False)


def register_token_commands(app: typer.Typer) -> None:
    """Add ``annotate token`` to the main command."""
    app.add_typer(token_app, name="token")
