"""The token check in front of Ray Serve LLM's OpenAI routes (service/serve/llm_ingress.py).

Ray's ``OpenAiIngress`` cannot be imported here: Ray Serve LLM needs vLLM, which needs a
GPU image. ``guarded`` is therefore applied to a stand-in with the same endpoint
signatures as Ray 2.60's (``completions(self, body, request: Request)``, ``models(self)``,
``model_data(self, model)``), served by a real FastAPI app over HTTP the way Serve's
class-based ingress calls it (the methods bound to one instance).
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from service.serve.llm_ingress import MIN_TOKEN_CHARS, TOKEN_ENV, authorized, guarded

TOKEN = "t" * MIN_TOKEN_CHARS


class _Ingress:
    """Ray's OpenAiIngress endpoint shapes, answering what they were given."""

    def __init__(self, model_cards: dict):
        self.cards = model_cards

    async def completions(self, body: dict, request: Request) -> dict:
        return {"completed": body["prompt"], "path": request.url.path}

    async def models(self) -> dict:
        return {"data": sorted(self.cards)}

    async def model_data(self, model: str) -> dict:
        return self.cards[model]


@pytest.fixture()
def client(monkeypatch):
    """The guarded stand-in behind a FastAPI app, the token in the environment."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    ingress = guarded(_Ingress, ["completions", "models", "model_data"])(model_cards={"m": {"id": "m"}})
    app = FastAPI()
    app.post("/v1/completions")(ingress.completions)
    app.get("/v1/models")(ingress.models)
    app.get("/v1/models/{model}")(ingress.model_data)
    return TestClient(app)


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "])
def test_every_route_refuses_without_the_token(client, header):
    """No token, a wrong one, another scheme: 401 on every route, with and without a Request of its own."""
    headers = {"authorization": header} if header is not None else {}
    assert client.post("/v1/completions", json={"prompt": "hi"}, headers=headers).status_code == 401
    assert client.get("/v1/models", headers=headers).status_code == 401
    assert client.get("/v1/models/m", headers=headers).status_code == 401


def test_the_token_opens_every_route(client):
    """With the bearer token each route answers as the unguarded method would."""
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/completions", json={"prompt": "hi"}, headers=headers).json() == \
        {"completed": "hi", "path": "/v1/completions"}
    assert client.get("/v1/models", headers=headers).json() == {"data": ["m"]}
    assert client.get("/v1/models/m", headers=headers).json() == {"id": "m"}


@pytest.mark.parametrize("token", [None, "short"])
def test_the_ingress_will_not_start_without_a_real_token(monkeypatch, token):
    """A missing or short token stops the replica: the route is never open by omission."""
    if token is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, token)
    with pytest.raises(RuntimeError, match=TOKEN_ENV):
        guarded(_Ingress, ["models"])(model_cards={})


def test_authorized_compares_the_whole_token():
    """Prefixes, suffixes and case changes of the token are refused; the scheme's case is not significant."""
    assert authorized(f"Bearer {TOKEN}", TOKEN) and authorized(f"bearer {TOKEN}", TOKEN)
    assert not any(authorized(f"Bearer {t}", TOKEN) for t in (TOKEN[:-1], TOKEN + "t", TOKEN.upper()))
