"""Who may call what: every route declares a scope as a dependency, checked before the route runs.

Routes declare ``dependencies=[READ]`` (or ``WRITE``, ``ADMIN``); ``authorize`` reads the
caller's token (bearer header or the console's cookie) and refuses it (401) or its scope
(403). Public routes (health, the console's login and static files) declare ``PUBLIC``.
``undeclared`` lists routes that declare neither, and the app refuses to start with any.
``check_request`` runs on every route: one well-formed Host header, and no cross-site
request that changes data.

FastAPI parses a JSON body before it solves dependencies, so an unauthenticated caller's
body is read (never acted on) up to ``ANNOTATE_MAX_BODY_BYTES``, the size limit that the
one middleware (``service.serve.http.BodyLimit``) enforces before anything is read.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import SecurityScopes

from service.api.context import Context, hosted
from service.api.security import (
    ANONYMOUS,
    COOKIE,
    OPERATOR,
    SCOPES,
    Caller,
    host_name,
    is_operator,
    presented_token,
    same_secret,
    split_token,
    tokens_required,
    trusted_locally,
)
from service.errors import BadRequest, Forbidden, TooManyRequests, Unauthenticated


async def authorize(request: Request, security_scopes: SecurityScopes) -> Caller:
    """The caller of this request, refused unless its token holds the scope the route declares."""
    (needed,) = security_scopes.scopes
    caller = await identify(hosted(request), presented_token(request.headers.get("authorization"),
                                                              request.cookies.get(COOKIE)), request)
    if not caller.allows(needed):
        raise Forbidden(f"this token has scope {caller.scope!r}; {request.method} {request.url.path} needs "
                        f"{needed!r} (scopes: {' < '.join(SCOPES)})")
    request.state.caller = caller
    return caller


def public() -> Caller:
    """Anyone may call a public route."""
    return ANONYMOUS


READ, WRITE, ADMIN = (Security(authorize, scopes=[scope]) for scope in SCOPES)
PUBLIC = Depends(public)


def route_scope(route: APIRoute) -> str | None:
    """The scope a route declares (None for a public one); KeyError when it declares none."""
    for dependency in route.dependant.dependencies:
        if dependency.call is authorize:
            return (dependency.own_oauth_scopes or [])[0]
        if dependency.call is public:
            return None
    raise KeyError(f"{sorted(route.methods or ())} {route.path} declares no scope")


def undeclared(routes: list[APIRoute]) -> list[str]:
    """The routes among ``routes`` that declare no scope: a programming error."""
    missing = []
    for route in routes:
        try:
            route_scope(route)
        except KeyError as exc:
            missing.append(str(exc.args[0]))
    return missing


def check_request(request: Request) -> None:
    """Every route's first check: the Host header, and that a browser's changing request comes from our pages."""
    _check_host(request)
    _refuse_cross_site(request)  # public routes too: the login form (login CSRF)


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


async def identify(ctx: Context, token: str | None, request: Request) -> Caller:
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
    if parts is None:
        raise Unauthenticated("invalid API token")
    record = await asyncio.to_thread(ctx.tokens.get, parts[0])
    if record is None or not same_secret(parts[1], record["secret_sha256"]):
        raise Unauthenticated("invalid API token")
    if record["revoked_at"]:
        raise Unauthenticated(f"API token {record['token_id']} was revoked at {record['revoked_at']}")
    return Caller(record["token_id"], record["scope"])


def caller_of(request: Request) -> Caller:
    """The caller the middleware let in."""
    return getattr(request.state, "caller", ANONYMOUS)
