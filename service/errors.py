"""Errors the service raises, one tree, each mapped to an HTTP status at the edge.

    AnnotateError                 base; status 500
    ├── InvalidInput (ValueError)  bad user input; 400/422
    │   ├── TaxonomyError          YAML that does not describe a valid taxonomy; 422
    │   ├── SqlRejected            SQL the sandbox refuses; 400
    │   └── PayloadTooLarge        a document or body over a configured limit; 413
    ├── NotFound (KeyError)        unknown taxonomy, job, ...; 404
    ├── Conflict                   the request clashes with current state; 409
    ├── SqlTimeout                 user SQL ran past its time limit; 408
    └── EngineError                the model backend failed; 502
        └── EngineUnavailable      it could not be loaded or reached; 503

Vendor errors (DuckDB, transformers, Ray) are translated with ``raise ... from exc``.
"""

from __future__ import annotations


class AnnotateError(Exception):
    """Base of every error the service reports to a user."""

    status_code = 500


class InvalidInput(AnnotateError, ValueError):
    """The caller sent something we cannot accept."""

    status_code = 422


class TaxonomyError(InvalidInput):
    """A taxonomy file failed validation; ``problems`` lists (location, line, message)."""

    status_code = 422

    def __init__(self, source: str, problems: list[tuple[str, int | None, str]]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(_format_problem(source, *p) for p in problems))


def _format_problem(source: str, location: str, line: int | None, message: str) -> str:
    """Render one problem as 'file:line: field: message', the shape editors jump to."""
    where = f"{source}:{line}" if line is not None else source
    return f"{where}: {location}: {message}" if location else f"{where}: {message}"


class BadRequest(InvalidInput):
    """The request itself is malformed (a header, not the body)."""

    status_code = 400


class SqlRejected(InvalidInput):
    """User SQL the sandbox does not allow."""

    status_code = 400


class PayloadTooLarge(InvalidInput):
    """A request or document is over a configured size limit."""

    status_code = 413


class Unauthenticated(AnnotateError):
    """No API token, or one that is unknown or revoked."""

    status_code = 401


class Forbidden(AnnotateError):
    """A valid token whose scope does not cover the request."""

    status_code = 403


class TooManyRequests(AnnotateError):
    """A per-token limit (such as concurrent jobs) is reached; retry later."""

    status_code = 429


class NotFound(AnnotateError, KeyError):
    """A named thing does not exist."""

    status_code = 404

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "not found"


class Conflict(AnnotateError):
    """The request clashes with the current state (e.g. cancelling a finished job)."""

    status_code = 409


class SqlTimeout(AnnotateError):
    """User SQL ran past its time limit and was interrupted."""

    status_code = 408


class EngineError(AnnotateError):
    """The model backend failed on a request."""

    status_code = 502


class EngineUnavailable(EngineError):
    """The model backend could not be loaded or reached."""

    status_code = 503


def cause_of(error: BaseException) -> BaseException:
    """The engine's own error inside a remote call's wrapper (Ray's ``.cause``), so failures keep their real name."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return error if isinstance(error, AnnotateError) else EngineError(f"{type(error).__name__}: {error}")
