"""The HTTP application: the API's and the console's routers, one error shape, and the body-size limit.

Every error leaves in one shape, ``{"error": {"type", "message", ...}}``, with the status
its ``AnnotateError`` class names. The OpenAPI schema is published at ``/openapi.json``.
Every route declares its scope (``service.api.auth``); ``create_api`` refuses one that does not.
Two middlewares: the body-size limit, which must act before a body is read, and the headers every
response carries so that no other site can frame the console (clickjacking: a framed gold-labelling
page would take a visitor's clicks) or have a reply sniffed as another type.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute

from service import __version__
from service.api import classifiers, jobs, quality, sql, system, taxonomies, tokens
from service.api.auth import check_request, undeclared
from service.api.context import hosted
from service.console import pages
from service.errors import AnnotateError, EngineUnavailable, Forbidden, PayloadTooLarge, TaxonomyError, Unauthenticated
from service.taxonomy import format_loc

ROUTERS = (system.router, taxonomies.router, jobs.router, quality.router, classifiers.router, sql.router, tokens.router,
           pages.router)


def create_api() -> FastAPI:
    """Build the FastAPI application with its routes and error handlers."""
    app = FastAPI(title="annotate", version=__version__, description="LLM-driven annotation service",
                  dependencies=[Depends(check_request)])
    app.exception_handler(AnnotateError)(_render_refusal)
    app.exception_handler(RequestValidationError)(_render_validation_error)
    for router in ROUTERS:
        app.include_router(router)
    if missing := undeclared(declared_routes()):
        raise ValueError(f"routes without a declared scope: {missing}")
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)  # outermost: the body limit's own 413 carries them too
    return app


def declared_routes() -> list[APIRoute]:
    """Every route of the API and the console, as declared in their routers."""
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]


class SecurityHeaders:
    """ASGI middleware: ``SECURITY_HEADERS`` on every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        return await self.app(scope, receive, with_headers)


class BodyLimit:
    """Refuse request bodies over ``ANNOTATE_MAX_BODY_BYTES``, counted as they stream in.

    ``Content-Length`` is checked before anything is read; a chunked body (no length) is
    counted chunk by chunk, and the request is answered 413 as soon as it passes the limit,
    whatever the route was doing with it (the route's own answer to a cut body is dropped).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        try:
            limit = hosted(request).settings.max_body_bytes
        except EngineUnavailable:  # still starting: the routes answer 503
            return await self.app(scope, receive, send)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return await _too_large(request, f"request body of {int(length):,} bytes", limit)(scope, receive, send)
        received, over, started = 0, False, False

        async def counted_receive():
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                over = True
                raise PayloadTooLarge(f"request body over the limit of {limit:,} bytes")
            return message

        async def held_send(message):
            nonlocal started
            if not over:
                started = True
                await send(message)

        try:
            await self.app(scope, counted_receive, held_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _too_large(request, f"request body of more than {received:,} bytes", limit)(scope, receive, send)


def _too_large(request: Request, what: str, limit: int) -> JSONResponse:
    """The 413 of a body over the limit, naming the setting."""
    return _render_error(request, PayloadTooLarge(f"{what} is over the limit of {limit:,} (ANNOTATE_MAX_BODY_BYTES); "
                                                  "use a server-side 'source' file"))


def _render_refusal(request: Request, exc: AnnotateError):
    """An error in the one shape; a console page refused for its token sends the visitor to the login page."""
    if isinstance(exc, (Unauthenticated, Forbidden)) and request.url.path.startswith("/console") \
            and request.method == "GET":
        return RedirectResponse(f"/console/login?next={quote(request.url.path)}&why={quote(str(exc))}", status_code=303)
    response = _render_error(request, exc)
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = 'Bearer realm="annotate"'
    return response


def _render_error(request: Request, exc: AnnotateError) -> JSONResponse:
    """One body shape for every error the service raises."""
    body: dict = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, TaxonomyError):
        body["problems"] = [{"location": loc, "line": line, "message": msg} for loc, line, msg in exc.problems]
    return JSONResponse({"error": body}, status_code=exc.status_code)


def _render_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic request errors in the same shape, each naming its field path."""
    problems = []
    for error in exc.errors():
        location = format_loc(error["loc"][1:])
        problems.append({"location": location or "body", "message": error["msg"]})
    message = "; ".join(f"{p['location']}: {p['message']}" for p in problems)
    body = {"type": "InvalidInput", "message": message, "problems": problems}
    return JSONResponse({"error": body}, status_code=422)
