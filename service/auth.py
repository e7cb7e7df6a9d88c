"""API tokens: bearer tokens with scopes, stored hashed, checked once for every route.

Scopes are ordered, each holding the ones below it:

- ``read``: job status and labels, SQL, reports, taxonomies, classifiers' predictions;
- ``write``: push taxonomies, submit and cancel jobs, gold samples and labels, calibration;
- ``admin``: tokens, training classifiers, and any route that declares no scope.

A token reads ``ann_<id>_<secret>``; the store keeps the id, its scope and the SHA-256 of
the secret. The secret is 256 random bits, so a slow password hash would add nothing, and
comparisons are constant-time. The operator's first token comes from the environment
(``ANNOTATE_ADMIN_TOKEN``): it holds ``admin`` and is never stored.

Tokens are required when ``ANNOTATE_AUTH`` is ``required``, or ``auto`` (the default) and
the service binds an address other than loopback. Where they are optional, a request
without one that names the service by a loopback name (``Host``; a DNS-rebinding page
cannot) acts with every scope; a request with a bad one is still refused. The
console's pages carry the token in an HttpOnly, SameSite=Strict cookie set at its login page.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

SCOPES = ("read", "write", "admin")
PREFIX = "ann_"
COOKIE = "annotate_token"
OPERATOR = "operator"  # the id of the environment's admin token


@dataclass(frozen=True)
class Caller:
    """Who is calling: a token id (None when tokens are optional and none was sent) and its scope."""

    token_id: str | None
    scope: str

    def allows(self, needed: str) -> bool:
        """Whether this caller's scope covers ``needed``."""
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


ANONYMOUS = Caller(None, "admin")


def new_token() -> tuple[str, str, str]:
    """A fresh (token id, full token to hand out once, hash of its secret to store)."""
    token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
    return token_id, f"{PREFIX}{token_id}_{secret}", digest(secret)


def digest(secret: str) -> str:
    """What the store keeps of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """(token id, secret) of a well-formed token, None otherwise."""
    if not token.startswith(PREFIX):
        return None
    token_id, _, secret = token[len(PREFIX):].partition("_")
    return (token_id, secret) if token_id and secret else None


def same_secret(secret: str, stored_digest: str) -> bool:
    """Constant-time check of a secret against its stored hash."""
    return hmac.compare_digest(digest(secret), stored_digest)


def is_operator(token: str, operator_token: str | None) -> bool:
    """Whether ``token`` is the operator's token from the environment."""
    return bool(operator_token) and hmac.compare_digest(token.encode(), operator_token.encode())


def tokens_required(mode: str, host: str) -> bool:
    """``auto`` requires tokens unless the service listens on loopback only."""
    if mode != "auto":
        return mode == "required"
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable from outside
        return True


def presented_token(authorization: str | None, cookie: str | None) -> str | None:
    """The token a request carries: the bearer header first, else the console's cookie."""
    if authorization:
        kind, _, value = authorization.partition(" ")
        return value.strip() if kind.lower() == "bearer" else authorization
    return cookie
