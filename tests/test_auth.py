"""API tokens on the real service, which requires them (as off loopback): every route, every refusal.

Each route the service declares is called with no token, a malformed one, a revoked one and
one whose scope is too low, and must refuse each (401, or 403 for the scope); with a token of
its scope it must let the request through to the route (whatever the route then answers).
Tokens are made, listed and revoked with the CLI; the file that keeps them holds no secret
and user SQL cannot open it. Where tokens are optional (loopback), the same app lets a
request without a token in and still refuses a bad one.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import ANNOTATE, FIXTURES
from fastapi import APIRouter
from fastapi.testclient import TestClient

from service.api.auth import route_scope, undeclared
from service.api.context import Context, attach
from service.api.security import SCOPES, tokens_required
from service.api.token_store import TokenStore
from service.serve.http import ROUTERS, create_api, declared_routes
from service.settings import Settings
from service.store import Store

ROUTES = declared_routes()
GUARDED = [(method, route.path, route_scope(route)) for route in ROUTES if route_scope(route) for method in route.methods]


@pytest.fixture(scope="module")
def tokens(service) -> dict[str, str]:
    """A token of each scope, and a revoked admin token, made by the operator."""
    made = {}
    with service.client() as client:
        for scope in (*SCOPES, "revoked"):
            body = client.post("/v1/tokens", json={"name": f"test {scope}", "scope": "admin" if scope == "revoked"
                                                   else scope}).json()
            made[scope] = body["token"]
            if scope == "revoked":
                assert client.delete(f"/v1/tokens/{body['token_id']}").json()["revoked_at"]
    return made


def _call(client, method: str, path: str, token: str | None):
    """Call a route with dummy path parameters and an empty JSON body, carrying ``token``."""
    url = re.sub(r"\{[^}]+\}", "x", path)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"json": {}} if method in ("POST", "PUT") else {}
    return client.request(method, url, headers=headers, follow_redirects=False, **body)


def _refused(response, status: int) -> bool:
    """The API refuses with ``status``; the console's pages send the visitor to its login page instead."""
    if response.request.url.path.startswith("/console") and response.request.method == "GET":
        return response.status_code == 303 and response.headers["location"].startswith("/console/login")
    return response.status_code == status and response.json()["error"]["message"]


def test_every_route_refuses_missing_bad_revoked_and_low_scope_tokens(service, tokens):
    """All declared routes, each refusal; and the right scope gets through to the route."""
    assert len(GUARDED) >= 35
    problems = []
    with service.client(token=None) as client:
        for method, path, scope in GUARDED:
            attempts = [("no token", None, 401), ("malformed", "ann_nope_nope", 401),
                        ("revoked", tokens["revoked"], 401)]
            if scope != "read":  # nothing is below read
                attempts.append(("scope below", tokens[SCOPES[SCOPES.index(scope) - 1]], 403))
            for what, token, status in attempts:
                response = _call(client, method, path, token)
                if not _refused(response, status):
                    problems.append(f"{method} {path} with {what}: {response.status_code} {response.text[:120]}")
            allowed = _call(client, method, path, tokens[scope])
            if allowed.status_code in (401, 403) or allowed.status_code >= 500:
                problems.append(f"{method} {path} with a {scope} token: {allowed.status_code} {allowed.text[:120]}")
    assert not problems, "\n".join(problems)


def test_every_route_the_app_serves_declares_its_scope():
    """Every API route declares a scope or PUBLIC; the app refuses to build with one that declares neither."""
    app = create_api()
    framework = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    served = [id(route.original_router) if hasattr(route, "original_router") else route.path for route in app.routes]
    assert set(served) == framework | {id(router) for router in ROUTERS}  # the framework's and our routers, no more
    assert not undeclared(ROUTES)
    public = {(route.path, method) for route in ROUTES if route_scope(route) is None for method in route.methods}
    assert public == {("/healthz", "GET"), ("/", "GET"), ("/console/static/{name}", "GET"),
                      ("/console/login", "GET"), ("/console/login", "POST")}

    forgetful = APIRouter()

    @forgetful.get("/v1/forgotten")
    async def forgotten() -> dict:
        return {}

    assert undeclared(forgetful.routes) == ["['GET'] /v1/forgotten declares no scope"]


def test_public_routes_need_no_token(service):
    """Health, the schema and the console's login and static files are open."""
    with service.client(token=None) as client:
        for path in ("/healthz", "/openapi.json", "/console/login", "/console/static/console.css"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/jobs").headers["www-authenticate"].startswith("Bearer")


def test_tokens_from_the_cli_are_hashed_and_revocable(service):
    """Create, list and revoke with the CLI; the token file has hashes only, and SQL cannot open it."""
    made = service.cli("token", "create", "cli reader", "--scope", "read").stdout
    token = re.search(r"ann_\w+_[\w-]+", made).group(0)
    token_id = token.split("_")[1]
    listed = service.cli("token", "list").stdout
    assert token_id in listed and token not in listed
    reader_env = {**service.env, "ANNOTATE_TOKEN": token}
    with service.client(token=token) as client:
        assert client.post("/v1/sql", json={"sql": "SELECT 1 AS one"}).json()["rows"] == [[1]]
        denied = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": [{"id": 1, "text": "hi"}]})
        assert denied.status_code == 403 and "needs 'write'" in denied.json()["error"]["message"]
    stored = (service.data_dir / "tokens.sqlite").read_bytes()
    assert token.split("_", 2)[2].encode() not in stored and token_id.encode() in stored
    with service.client() as client:
        peek = client.post("/v1/sql", json={"sql": f"SELECT * FROM read_blob('{service.data_dir}/tokens.sqlite')"})
        assert peek.status_code == 400
    refused = subprocess.run([str(ANNOTATE), "submit", str(FIXTURES / "sms.jsonl"), "-t", "sms-spam"], env=reader_env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "403" in refused.stderr
    service.cli("token", "revoke", token_id)
    with service.client(token=token) as client:
        gone = client.post("/v1/sql", json={"sql": "SELECT 1"})
    assert gone.status_code == 401 and "revoked" in gone.json()["error"]["message"]


def test_a_token_may_hold_only_so_many_active_jobs(service, labelled_taxonomy):
    """The ninth queued job of a token is refused with 429; cancelling one makes room."""
    with service.client() as operator:
        token = operator.post("/v1/tokens", json={"name": "busy", "scope": "write"}).json()["token"]
    documents = [{"id": i, "text": f"message {i} for the limit test"} for i in range(3000)]
    submitted = []
    with service.client(token=token) as client:
        try:
            for _ in range(8):
                response = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "slow-fake",
                                                         "documents": documents})
                assert response.status_code == 202, response.text
                submitted.append(response.json()["job_id"])
            refused = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "slow-fake", "documents": documents})
            assert refused.status_code == 429, refused.text
            assert "ANNOTATE_MAX_ACTIVE_JOBS_PER_TOKEN" in refused.json()["error"]["message"]
            assert client.delete(f"/v1/jobs/{submitted[-1]}").json()["status"] == "cancelled"
            again = client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "slow-fake", "documents": documents})
            assert again.status_code == 202, again.text
            submitted.append(again.json()["job_id"])
        finally:
            for job_id in submitted:
                client.delete(f"/v1/jobs/{job_id}")


@pytest.mark.parametrize(("mode", "host", "required"), [
    ("auto", "127.0.0.1", False), ("auto", "::1", False), ("auto", "localhost", False), ("auto", "0.0.0.0", True),
    ("auto", "10.1.2.3", True), ("auto", "annotate.internal", True), ("required", "127.0.0.1", True),
    ("off", "0.0.0.0", False)])
def test_when_tokens_are_required(mode, host, required):
    """'auto' requires tokens whenever the service listens beyond loopback."""
    assert tokens_required(mode, host) is required


def test_loopback_without_tokens_still_refuses_bad_ones(tmp_path):
    """On loopback with ANNOTATE_AUTH=auto a request without a token passes, unless it names another host or comes
    cross-site from a browser; a bad or revoked token does not."""
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", auth="auto")
    store, tokens = Store(settings.db_path, export_dir=settings.export_dir), TokenStore(tmp_path / "tokens.sqlite")
    attach(Context(settings, store, None, {}, None, None, None, tokens))
    try:
        with TestClient(create_api(), base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000)) as client:
            assert client.get("/v1/jobs").status_code == 200
            rebound = client.get("/v1/jobs", headers={"host": "attacker.example:8000"})  # DNS rebinding
            assert rebound.status_code == 401
            cross = client.post("/v1/tokens", json={"name": "x", "scope": "admin"}, headers={"sec-fetch-site": "cross-site"})
            assert cross.status_code == 403 and "cross-site" in cross.json()["error"]["message"]
            assert client.get("/v1/jobs", headers={"Authorization": "Bearer ann_bad_bad"}).status_code == 401
            made = client.post("/v1/tokens", json={"name": "reader", "scope": "read"}).json()
            reader = {"Authorization": f"Bearer {made['token']}"}
            assert client.get("/v1/jobs", headers=reader).status_code == 200
            assert client.post("/v1/tokens", json={"name": "x", "scope": "read"}, headers=reader).status_code == 403
            client.delete(f"/v1/tokens/{made['token_id']}")
            assert client.get("/v1/jobs", headers=reader).status_code == 401
    finally:
        attach(None)
        store.close()
        tokens.close()
