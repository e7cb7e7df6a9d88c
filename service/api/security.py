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
without one acts with every scope only when all of these hold (``trusted_locally``):

- the connection's peer address is loopback (the socket, not a header);
- it carries exactly one ``Host`` header, strictly parsed, naming a loopback name
  (``localhost``, ``127.0.0.1``, ``[::1]``): a DNS-rebinding page names another host, and a
  request without ``Host`` (HTTP/1.0) is not trusted;
- it carries no proxy header (``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``): behind a
  reverse proxy on the same machine every outside request would otherwise come from
  loopback, so a proxied request needs a token (set ``ANNOTATE_AUTH=required`` behind a
  proxy that adds no such header).

A malformed ``Host`` (``127.0.0.1@evil.com``, ``evil.com#@127.0.0.1``, ``a, b``, two
headers) is refused with 400 before anything else. A request with a bad token is refused
whatever its address. The console's pages carry the token in an HttpOnly,
SameSite=Strict cookie set at its login page.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass

from service.vocabulary import Scope, values

SCOPES = values(Scope)
PREFIX = "ann_"
COOKIE = "annotate_token"
OPERATOR = "operator"  # the id of the environment's admin token
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip")
# RFC 9110 Host: a registered name or IPv4 address, or an IPv6 literal in brackets, then an optional port.
_HOST = re.compile(r"(?P<name>[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[(?P<ipv6>[0-9A-Fa-f:.]{2,45})\])(?::(?P<port>[0-9]{1,5}))?")


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
    if not operator_token:
        return False
    return hmac.compare_digest(token.encode(), operator_token.encode())


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


def host_name(header: str) -> str:
    """The host a ``Host`` header names (lower case, IPv6 without brackets); ValueError if malformed."""
    match = _HOST.fullmatch(header)
    if not match or (match["port"] and int(match["port"]) > 65535):
        raise ValueError(f"malformed Host header {header[:100]!r}: expected host[:port]")
    if match["ipv6"]:
        ipaddress.IPv6Address(match["ipv6"])  # ValueError when it is not one
        return match["ipv6"].lower()
    return match["name"].lower()


def is_loopback_address(address: str) -> bool:
    """Whether a peer address (the socket's, not a header's) is a loopback address."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def trusted_locally(peer: str, hosts: list[str], header_names: set[str]) -> bool:
    """Whether a tokenless request may act with every scope where tokens are optional (see the module's rule)."""
    return (is_loopback_address(peer) and len(hosts) == 1 and host_name(hosts[0]) in LOOPBACK_NAMES
            and not header_names & set(PROXY_HEADERS))


class FailureCounter:
    """Failed authentications per client address in a sliding window, so tokens cannot be guessed at speed.

    Kept in the ingress process (one replica). Addresses whose failures have all aged out
    are forgotten, so an attacker cycling addresses cannot grow it without bound for long.
    """

    def __init__(self, limit: int, window_s: float = 60.0, clock=time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.failures: dict[str, deque] = {}

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again (0 when it may now)."""
        times = self._recent(self.failures.get(address, deque()))
        return self.window_s - (self.clock() - times[0]) if len(times) >= self.limit else 0.0

    def failed(self, address: str) -> None:
        """Count one failed authentication from ``address``."""
        self._recent(self.failures.setdefault(address, deque())).append(self.clock())
        if len(self.failures) > 10_000:
            for stale in [a for a, times in self.failures.items() if not self._recent(times)]:
                del self.failures[stale]

    def _recent(self, times: deque) -> deque:
        """``times`` without the failures older than the window."""
        while times and self.clock() - times[0] > self.window_s:
            times.popleft()
        return times


def presented_token(authorization: str | None, cookie: str | None) -> str | None:
    """The token a request carries: the bearer header first, else the console's cookie."""
    if authorization:
        kind, _, value = authorization.partition(" ")
        return value.strip() if kind.lower() == "bearer" else authorization
    return cookie
