"""ASGI adapter of :mod:`appliance.core.admission`: refuses floods, scanners and foreign origins before the app.

Wraps the Litestar app in ``server.py`` (outside Litestar, so refusals cost no routing and
cover every path). uvicorn's proxy-headers middleware runs first, so ``scope["client"]``
is the real peer when the request came through a proxy in ``FORWARDED_ALLOW_IPS``.

What a refused peer sees (docs/protocol.md, "Abuse limits"):

- a WebSocket handshake with an ``Origin`` that is not allowed: HTTP 403 before the upgrade;
- an address in its cool-down after too many failed handshakes: HTTP 429 with ``Retry-After``,
  before the upgrade (no WebSocket is opened, so a scanner costs one small response);
- over the per-address or per-token connection cap: the WebSocket is accepted and closed
  with 4013, so that clients (Unity too) can read why and back off;
- HTTP requests over the per-address rate, or during a cool-down: 429 with ``Retry-After``;
  a state-changing request (POST, PUT, PATCH, DELETE) from a foreign origin: 403;
- an HTTP request while its address already holds ``MAX_CONNECTIONS_PER_ADDRESS``
  WebSockets and unanswered requests: 429 (each request counts until its answer starts);
- a body announced larger than :func:`max_request_bytes`: 413, before a byte of it is read.

The failed handshakes counted are the relay's own refusals (4001, 4002, 4003, 4016) and HTTP
401/403 answers, read from the messages the app sends; the app needs no hook for them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Counter

from .core.admission import Admission, AdmissionLimits, Refusal, parse_networks
from .core.protocol import CLOSE_REASONS, CloseCode, negotiate_subprotocol
from .metrics import REGISTRY
from .settings import Settings

__all__ = ["AdmissionMiddleware", "OriginPolicy", "ADMISSION_REFUSED", "COOLDOWNS", "limits_from", "max_request_bytes"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]  # Litestar types its own scopes more narrowly.

ADMISSION_REFUSED = Counter(
    "wsbridge_admission_refused_total",
    "Handshakes and HTTP requests refused before the app: cooldown, address_limit, token_limit, http_rate, origin, "
    "cross_origin, body_too_large.",
    ["reason"],
    registry=REGISTRY,
)
COOLDOWNS = Counter(
    "wsbridge_address_cooldowns_total",
    "Cool-downs started for addresses that failed too many handshakes.",
    registry=REGISTRY,
)

#: Close codes that count as a failed handshake: what a token or id scanner produces.
#: A banned peer that keeps trying (4016) is cooled down like a scanner: refused before the upgrade, for free.
_FAILED_CODES = frozenset(
    {CloseCode.UNAUTHORIZED, CloseCode.INVALID_CLIENT_ID, CloseCode.RESERVED_ID, CloseCode.BANNED}
)
#: Monitoring must keep working for an address that is cooling down or busy.
_UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def limits_from(settings: Settings) -> AdmissionLimits:
    return AdmissionLimits(
        connections_per_address=settings.max_connections_per_address,
        connections_per_token=settings.max_connections_per_token,
        failed_handshakes_per_minute=settings.max_failed_handshakes_per_minute,
        cooldown_seconds=settings.handshake_cooldown,
        http_rate=settings.http_requests_per_second,
        http_burst=settings.http_burst,
        exempt=parse_networks(settings.limits_exempt_ips),
    )


def max_request_bytes(settings: Settings) -> int:
    """The largest HTTP request body accepted: a command of MAX_MESSAGE_BYTES, JSON-escaped, with room to spare."""
    return max(8 * settings.max_message_bytes, 1 << 20)


def _origin(value: str) -> str | None:
    """``scheme://host[:port]`` lower-cased, default port dropped; None for ``null`` and junk."""
    try:
        parts = urlsplit(value.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS.get(parts.scheme) else "")


class OriginPolicy:
    """Which browser origins may open sockets and change state: the appliance's own, plus ``ALLOWED_ORIGINS``."""

    def __init__(self, allowed: str, public_url: str | None = None) -> None:
        entries = [part.strip() for part in allowed.split(",") if part.strip()]
        self.any = "*" in entries
        self.allowed = {o for o in map(_origin, entries) if o} | ({"null"} if "null" in entries else set())
        if public_url and (own := _origin(public_url)):
            self.allowed.add(own.replace("ws://", "http://").replace("wss://", "https://"))

    def allows(self, origin: str, host: str | None, scheme: str) -> bool:
        if self.any:
            return True
        normal = _origin(origin)
        if normal is None:
            return origin.strip() == "null" and "null" in self.allowed
        if normal in self.allowed:
            return True
        # Same origin: the page was served by this appliance (the dashboard), under the Host it asked for.
        if host:
            https = scheme in ("https", "wss")
            own = _origin(f"{'https' if https else 'http'}://{host}")
            # Behind a TLS proxy the app sees http but the page was https: the host decides.
            return own is not None and normal.split("://", 1)[1] == own.split("://", 1)[1]
        return False


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The headers admission reads (first occurrence of each)."""
    wanted = {b"origin", b"host", b"x-auth-token", b"sec-fetch-site", b"content-length"}
    found: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        if name in wanted and name not in found:
            found[name] = value
    return found


def _token_key(scope: Scope, headers: dict[bytes, bytes]) -> str | None:
    """A digest of the presented token, read as the relay reads it; the value itself is never kept."""
    header = headers.get(b"x-auth-token")
    token = header.decode("latin-1") if header else negotiate_subprotocol(list(scope.get("subprotocols") or []))[0]
    if not token:
        return None
    return hashlib.blake2b(token.encode("latin-1", "replace"), digest_size=16).hexdigest()


def _retry_after(seconds: float) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(max(1, math.ceil(seconds))).encode())]


class AdmissionMiddleware:
    """The ASGI wrapper; one per app, holding this instance's :class:`Admission`."""

    def __init__(self, app: ASGIApp, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.clock = clock
        self.admission = Admission(limits_from(settings), clock())
        self.origins = OriginPolicy(settings.allowed_origins, settings.public_url)
        self.max_body = max_request_bytes(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] not in _UNLIMITED_PATHS:
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _address(self, scope: Scope) -> str:
        client = scope.get("client")
        return str(client[0]) if client else "unknown"

    def _failed(self, address: str) -> None:
        if self.admission.handshake_failed(address, self.clock()):
            COOLDOWNS.inc()
            log.warning(
                "Address %s failed too many handshakes; refused for %.0f s",
                address,
                self.admission.limits.cooldown_seconds,
            )

    def _refused(self, reason: str, address: str) -> None:
        ADMISSION_REFUSED.labels(reason=reason).inc()
        log.info("Refused %s from %s", reason.replace("_", " "), address)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        address = self._address(scope)
        if self._foreign(scope, headers, require_origin=False):
            self._refused("origin", address)
            await _reject_upgrade(receive, send, 403, b"origin not allowed", [])
            return
        token_key = _token_key(scope, headers)
        refusal = self.admission.admit_socket(address, token_key, self.clock())
        if refusal is Refusal.COOLDOWN:
            self._refused(refusal.value, address)
            wait = self.admission.cooling_down(address, self.clock())
            await _reject_upgrade(receive, send, 429, b"too many failed handshakes", _retry_after(wait))
            return
        if refusal is not None:
            self._refused(refusal.value, address)
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            code = CloseCode.TOO_MANY_CONNECTIONS
            await send({"type": "websocket.close", "code": int(code), "reason": CLOSE_REASONS[code]})
            return

        async def observed(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "websocket.close" and message.get("code") in _FAILED_CODES:
                self._failed(address)
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.admission.release_socket(address, token_key)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        address = self._address(scope)
        wait = self.admission.admit_http(address, self.clock())
        if wait > 0:
            cooling = self.admission.cooling_down(address, self.clock()) > 0
            self._refused("cooldown" if cooling else "http_rate", address)
            await _respond(send, 429, "cooldown" if cooling else "rate_limited", _retry_after(wait))
            return
        headers = _headers(scope)
        if scope.get("method", "GET") not in _SAFE_METHODS and self._foreign(scope, headers, require_origin=True):
            self._refused("cross_origin", address)
            await _respond(send, 403, "cross_origin", [])
            return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:  # Checked before a byte of the body is read.
            self._refused("body_too_large", address)
            await _respond(send, 413, "body_too_large", [(b"connection", b"close")])
            return
        if self.admission.admit_request(address, self.clock()) is not None:
            self._refused("address_limit", address)
            await _respond(send, 429, "too_many_connections", [*_retry_after(1), (b"connection", b"close")])
            return
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.admission.release_request(address)

        async def observed(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                release()  # Answered: no longer a request the peer may hold open for nothing.
                if message.get("status") in (401, 403):
                    self._failed(address)
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            release()

    def _foreign(self, scope: Scope, headers: dict[bytes, bytes], *, require_origin: bool) -> bool:
        """True when a browser sent this from a page of an origin that is not allowed.

        ``Sec-Fetch-Site`` (set by the browser, never by a page) decides first: a
        same-origin request may carry ``Origin: null`` (the dashboard's
        ``Referrer-Policy: no-referrer`` makes Chromium send that on form posts). Without
        it, the ``Origin`` header decides; a request with neither is not from a browser
        page (or from one too old to send them) and passes.
        """
        site = headers.get(b"sec-fetch-site")
        if site in (b"same-origin", b"none"):
            return False
        origin = headers.get(b"origin")
        if origin is None:
            return require_origin and site is not None  # A cross-site browser request we cannot place.
        host = (headers.get(b"host") or b"").decode("latin-1") or None
        return not self.origins.allows(origin.decode("latin-1"), host, scope.get("scheme", ""))


async def _reject_upgrade(
    receive: Receive, send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """An HTTP answer instead of the upgrade (ASGI websocket.http.response): no WebSocket is opened."""
    await receive()  # websocket.connect
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


_BODIES = {
    "cooldown": b'{"error":"cooldown","detail":"too many failed requests from this address; retry later"}',
    "rate_limited": b'{"error":"rate_limited","detail":"too many requests from this address; retry later"}',
    "cross_origin": b'{"error":"cross_origin","detail":"state-changing requests from another origin are refused"}',
    "body_too_large": b'{"error":"body_too_large","detail":"the request body is larger than this appliance accepts"}',
    "too_many_connections": b'{"error":"too_many_connections","detail":"too many open requests and connections '
    b'from this address; retry later"}',
}


async def _respond(send: Send, status: int, error: str, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": _BODIES[error]})
