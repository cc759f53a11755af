"""The client's address behind a proxy: ``X-Forwarded-For`` from a trusted proxy, checked before anything reads it.

Replaces uvicorn's proxy-headers middleware, which took any text in the header as the
client's address: from a trusted peer, ``<b>xff</b>`` was stored as a client's address and
written into the access log, and ``127.0.0.1`` made a remote peer exempt from the
per-address limits. Here, only when the TCP peer is in ``FORWARDED_ALLOW_IPS``:

- the entries of every ``X-Forwarded-For`` header are read from the right (each proxy
  appends the address it saw); entries of trusted proxies are skipped, and the first
  untrusted entry is the client (with ``*``, every peer is trusted and the leftmost entry
  is the client, as in uvicorn);
- that entry must be a valid IP address (optionally with a port) outside
  ``LIMITS_EXEMPT_IPS``: an exemption is for same-host peers, never claimed by a header.
  Otherwise, or when every entry is a trusted proxy, the TCP peer's own address stays,
  ``wsbridge_forwarded_for_refused_total`` counts it and one line (flood-limited) says so;
- ``X-Forwarded-Proto`` sets the scheme when it is ``http``, ``https``, ``ws`` or ``wss``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter

from .core.admission import parse_networks
from .metrics import REGISTRY
from .settings import Settings

__all__ = ["FORWARDED_FOR_REFUSED", "ForwardedForMiddleware", "client_from_forwarded"]

log = logging.getLogger(__name__)

FORWARDED_FOR_REFUSED = Counter(
    "wsbridge_forwarded_for_refused_total",
    "X-Forwarded-For values from a trusted proxy not used as the client's address (not an IP address, an exempt "
    "address, or only proxies): the proxy's own address was used.",
    registry=REGISTRY,
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_entry(entry: str) -> tuple[Address, int] | None:
    """``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1`` or ``[2001:db8::1]:5678`` as (address, port); None for anything else."""
    host, port = entry, 0
    if entry.startswith("["):
        end = entry.find("]")
        if end == -1:
            return None
        host, rest = entry[1:end], entry[end + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif entry.count(":") == 1:
        host, _, digits = entry.partition(":")
        if not digits.isdigit():
            return None
        port = int(digits)
    try:
        return ipaddress.ip_address(host), port if port <= 65535 else 0
    except ValueError:
        return None


def client_from_forwarded(
    header: str, trusted: tuple[Network, ...] | None, exempt: tuple[Network, ...]
) -> tuple[str, int] | None:
    """The client (address, port) named by an ``X-Forwarded-For`` value, or None to keep the peer.

    ``trusted`` None means every proxy is trusted (``FORWARDED_ALLOW_IPS=*``).
    """
    entries = [entry.strip() for entry in header.split(",")]
    if trusted is None:
        chosen = entries[0]
    else:
        for entry in reversed(entries):
            parsed = _parse_entry(entry)
            if parsed is None or not any(parsed[0] in network for network in trusted):
                chosen = entry
                break
        else:
            return None  # Only proxies: the nearest one (the peer) is who we can hold to account.
    parsed = _parse_entry(chosen)
    if parsed is None or any(parsed[0] in network for network in exempt):
        return None
    return str(parsed[0]), parsed[1]


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class ForwardedForMiddleware:
    """The outermost ASGI layer (before admission): sets ``scope["client"]`` and ``scope["scheme"]``."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        allowed = settings.forwarded_allow_ips.strip()
        entries = [part.strip() for part in allowed.split(",") if part.strip()]
        self.trusted: tuple[Network, ...] | None = None if "*" in entries else parse_networks(allowed)
        self.exempt = parse_networks(settings.limits_exempt_ips)

    def _trusts(self, peer: str | None) -> bool:
        if self.trusted is None:
            return True
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            peer = scope.get("client")
            if self._trusts(peer[0] if peer else None):
                self._apply(scope, peer)
        await self.app(scope, receive, send)

    def _apply(self, scope: Scope, peer: Any) -> None:
        proto: bytes | None = None
        forwarded: list[bytes] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-proto":
                proto = value
            elif name == b"x-forwarded-for":
                forwarded.append(value)
        if proto is not None:
            scheme = proto.decode("latin-1").strip()
            if scheme in ("http", "https", "ws", "wss"):
                scope["scheme"] = scheme.replace("http", "ws") if scope["type"] == "websocket" else scheme
        if not forwarded:
            return
        client = client_from_forwarded(b", ".join(forwarded).decode("latin-1"), self.trusted, self.exempt)
        if client is None:
            FORWARDED_FOR_REFUSED.inc()
            # The value itself is not logged: it is whatever the client wrote (a forged log line, markup).
            log.info("X-Forwarded-For from %s not used (not a client IP address): the proxy's address is used", peer[0])
            return
        scope["client"] = client
