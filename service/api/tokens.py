"""Routes of API tokens (admin): create one (its secret is shown once), list them, revoke one."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.api.auth import ADMIN
from service.api.context import hosted
from service.api.security import new_token
from service.vocabulary import Scope

router = APIRouter(tags=["tokens"])


class TokenRequest(BaseModel):
    """A token to create: who or what it is for, and its scope."""

    name: str = Field(min_length=1, max_length=100, description="Who or what holds the token.")
    scope: Scope = Field(description="read < write < admin; each holds the ones below.")


@router.post("/v1/tokens", dependencies=[ADMIN], status_code=201)
async def create_token(request: Request, body: TokenRequest) -> JSONResponse:
    """Make a token; the answer is the only time its secret is shown."""
    token_id, token, secret_digest = new_token()
    record = await asyncio.to_thread(hosted(request).tokens.create, token_id, name=body.name, scope=body.scope,
                                     secret_digest=secret_digest)
    return JSONResponse({**record, "token": token}, status_code=201)


@router.get("/v1/tokens", dependencies=[ADMIN])
async def list_tokens(request: Request) -> list[dict]:
    """Every token, without secrets."""
    return await asyncio.to_thread(hosted(request).tokens.list)


@router.delete("/v1/tokens/{token_id}", dependencies=[ADMIN])
async def revoke_token(request: Request, token_id: str) -> dict:
    """Revoke a token at once."""
    return await asyncio.to_thread(hosted(request).tokens.revoke, token_id)
