"""Authentication at the HTTP boundary: one middleware checks every request against its route's scope.

Every route declares ``scope`` (``read``, ``write``, ``admin``, or None for the public
ones: health, the console's static files and login). ``create_api`` refuses a route that
declares none, so no endpoint can be added unguarded. The check runs before the body is
read. Token management (``/v1/tokens``) and the console's login live here too.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.routing import Match

from service.api.context import Context, hosted
from service.api.security import (
    ANONYMOUS,
    COOKIE,
    OPERATOR,
    SCOPES,
    Caller,
    host_name,
    is_operator,
    new_token,
    presented_token,
    same_secret,
    split_token,
    tokens_required,
    trusted_locally,
)
from service.console.pages import render_page
from service.errors import AnnotateError, BadRequest, Forbidden, TooManyRequests, Unauthenticated


class TokenRequest(BaseModel):
    """A token to create: who or what it is for, and its scope."""

    name: str = Field(min_length=1, max_length=100, description="Who or what holds the token.")
    scope: str = Field(pattern="^(read|write|admin)$", description="read < write < admin; each holds the ones below.")


def route_scopes(routes: list[dict]) -> dict[tuple[str, str], str | None]:
    """(path, method) → scope of every route; a route that declares none is a programming error."""
    undeclared = [route["path"] for route in routes if "scope" not in route]
    if undeclared:
        raise ValueError(f"routes without a declared scope: {undeclared}")
    return {(route["path"], method): route["scope"] for route in routes for method in route["methods"]}


def guard(app, scopes: dict[tuple[str, str], str | None], render_error):
    """The middleware: check the Host and the request's origin, find the route, check the caller's token
    against its scope, remember the caller.

    ``render_error`` is the API's own error renderer, so refusals have the one error shape.
    """

    async def authenticate(request: Request, call_next):
        try:
            _check_host(request)
            _refuse_cross_site(request)  # public routes too: the login form (login CSRF)
            needed = _needed_scope(app, scopes, request)
            if needed is None:
                return await call_next(request)
            ctx = hosted(request)
            caller = await _identify(ctx, presented_token(request.headers.get("authorization"),
                                                          request.cookies.get(COOKIE)), request)
            if not caller.allows(needed):
                raise Forbidden(f"this token has scope {caller.scope!r}; {request.method} {request.url.path} needs "
                                f"{needed!r} (scopes: {' < '.join(SCOPES)})")
        except AnnotateError as exc:  # raised here, outside the routes' error handlers
            return _refuse(request, exc, render_error)
        request.state.caller = caller
        return await call_next(request)

    return authenticate


def _needed_scope(app, scopes: dict, request: Request) -> str | None:
    """The scope the matched route declares; None for public routes and for no match (404/405 follow)."""
    if request.url.path in (app.openapi_url, app.docs_url, app.redoc_url, "/docs/oauth2-redirect"):
        return None
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return scopes.get((route.path, request.method), "admin")  # undeclared (mounted, framework): admin only
    return None


def _check_host(request: Request) -> None:
    """At most one Host header, and a well-formed one (Starlette would fall back to the socket's address)."""
    hosts = request.headers.getlist("host")
    if len(hosts) > 1:
        raise BadRequest(f"{len(hosts)} Host headers; send one")
    if hosts:
        try:
            host_name(hosts[0])
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc


def _refuse_cross_site(request: Request) -> None:
    """A browser's request that changes something must come from the service's own pages (no CSRF).

    Browsers say where a request comes from in ``Sec-Fetch-Site`` (recent ones), ``Origin``
    (every cross-origin POST) or ``Referer``; any of them naming another site refuses it.
    API clients send none of them and pass. The origin is compared by host and port with
    the ``Host`` the request was sent to, so a TLS proxy in front changes nothing.
    """
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        raise Forbidden("cross-site requests that change data are refused; call the API directly or use the console")
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        raise Forbidden(f"a request from another origin ({origin[:100]!r}) that changes data is refused; call the "
                        "API directly or use the console")


def _peer(request: Request) -> str:
    """The connection's peer address (the socket's, never a header's)."""
    return request.client.host if request.client else "unknown"


async def _identify(ctx: Context, token: str | None, request: Request) -> Caller:
    """Who presents this token, or Unauthenticated saying why not; tokenless only where optional and trusted locally.

    An invalid token from an address that sent too many in the last minute is answered 429
    (``ANNOTATE_AUTH_FAILURES_PER_MINUTE``); a valid token always passes, so a guesser behind
    the same proxy address as everyone else cannot lock the others out.
    """
    if token is None:
        if tokens_required(ctx.settings.auth, ctx.settings.host) or not _trusted_locally(request):
            raise Unauthenticated("this service needs an API token: send 'Authorization: Bearer ann_…' "
                                  "(`annotate token create` makes one; ANNOTATE_TOKEN for the CLI)")
        return ANONYMOUS
    try:
        return await _caller_of_token(ctx, token)
    except Unauthenticated:
        address = _peer(request)
        if wait := ctx.auth_failures.blocked_for(address):
            raise TooManyRequests(f"too many invalid API tokens from this address; retry in {wait:.0f} s "
                                  "(ANNOTATE_AUTH_FAILURES_PER_MINUTE)") from None
        ctx.auth_failures.failed(address)
        raise


def _trusted_locally(request: Request) -> bool:
    """The loopback rule of ``auth.trusted_locally`` applied to this request."""
    return trusted_locally(_peer(request), request.headers.getlist("host"), set(request.headers.keys()))


async def _caller_of_token(ctx: Context, token: str) -> Caller:
    """The caller a presented token stands for; Unauthenticated when it is unknown, wrong or revoked."""
    if is_operator(token, ctx.settings.admin_token):
        return Caller(OPERATOR, "admin")
    parts = split_token(token)
    record = await asyncio.to_thread(ctx.tokens.get, parts[0]) if parts else None
    if record is None or not same_secret(parts[1], record["secret_sha256"]):
        raise Unauthenticated("invalid API token")
    if record["revoked_at"]:
        raise Unauthenticated(f"API token {record['token_id']} was revoked at {record['revoked_at']}")
    return Caller(record["token_id"], record["scope"])


def _refuse(request: Request, exc: AnnotateError, render_error):
    """401/403 in the API's error shape; the console's pages send people to the login page instead."""
    if isinstance(exc, (Unauthenticated, Forbidden)) and request.url.path.startswith("/console") \
            and request.method == "GET":
        return RedirectResponse(f"/console/login?next={quote(request.url.path)}&why={quote(str(exc))}", status_code=303)
    response = render_error(request, exc)
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = 'Bearer realm="annotate"'
    return response


def caller_of(request: Request) -> Caller:
    """The caller the middleware let in."""
    return getattr(request.state, "caller", ANONYMOUS)


async def create_token(request: Request, body: TokenRequest) -> JSONResponse:
    """Make a token; the answer is the only time its secret is shown."""
    token_id, token, secret_digest = new_token()
    record = await asyncio.to_thread(hosted(request).tokens.create, token_id, name=body.name, scope=body.scope,
                                     secret_digest=secret_digest)
    return JSONResponse({**record, "token": token}, status_code=201)


async def list_tokens(request: Request) -> list[dict]:
    """Every token, without secrets."""
    return await asyncio.to_thread(hosted(request).tokens.list)


async def revoke_token(request: Request, token_id: str) -> dict:
    """Revoke a token at once."""
    return await asyncio.to_thread(hosted(request).tokens.revoke, token_id)


async def login_page(request: Request, next: str = "/console", why: str = "") -> HTMLResponse:
    """Ask for a token (the console's pages cannot send a bearer header)."""
    return render_page("login.html", why=why, next=_local(next))


async def login(request: Request):
    """Check the form's token, then keep it in an HttpOnly, SameSite=Strict cookie."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_FORM_BYTES:
            return HTMLResponse("login form too large", status_code=413)
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    token, next = form.get("token", "").strip(), form.get("next", "/console")
    try:
        if is_operator(token, hosted(request).settings.admin_token):
            raise Unauthenticated("the operator's token is not for browsers: sign in with a token made by "
                                  "`annotate token create`")
        if not token:
            raise Unauthenticated("enter an API token")
        await _identify(hosted(request), token, request)
    except (Unauthenticated, TooManyRequests) as exc:
        return render_page("login.html", status_code=exc.status_code, why=str(exc), next=_local(next))
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


LOGIN_FORM_BYTES = 4096


def _local(path: str) -> str:
    """Only redirect within the console (no open redirects)."""
    return path if path.startswith("/console") and "//" not in path else "/console"


AUTH_ROUTES = [
    dict(path="/v1/tokens", endpoint=create_token, scope="admin", methods=["POST"], status_code=201, tags=["tokens"]),
    dict(path="/v1/tokens", endpoint=list_tokens, scope="admin", methods=["GET"], tags=["tokens"]),
    dict(path="/v1/tokens/{token_id}", endpoint=revoke_token, scope="admin", methods=["DELETE"], tags=["tokens"]),
    dict(path="/console/login", endpoint=login_page, scope=None, methods=["GET"], include_in_schema=False,
         response_class=HTMLResponse),
    dict(path="/console/login", endpoint=login, scope=None, methods=["POST"], include_in_schema=False),
]
