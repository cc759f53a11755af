"""Response headers for every dashboard response: a strict CSP and no caching of pages with secrets.

Each response also says how long the server spent on it (``Server-Timing``). The policy allows scripts, styles and connections from the appliance itself only: no inline
script or style, no ``eval`` (htmx is configured not to need it), no framing, forms post only
to the appliance. Cookies set under ``/admin`` get ``Secure`` when the request came over TLS
(directly, or through a proxy trusted by ``FORWARDED_ALLOW_IPS`` that says so).
"""

from __future__ import annotations

import time

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_SECURITY_POLICY", "SecurityHeadersMiddleware"]

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ]
)

_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}


class SecurityHeadersMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        started = time.perf_counter()
        secure = scope.get("scheme") == "https"
        static = "/static/" in scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableScopeHeaders.from_message(message)
                # Session, CSRF, handler and template rendering: what the bench's "server time" means.
                headers.add("server-timing", f"app;dur={(time.perf_counter() - started) * 1000:.1f}")
                for name, value in _HEADERS.items():
                    headers[name] = value
                if not static:  # Pages may hold secrets (a new token is shown once): never cache them.
                    headers["cache-control"] = "no-store"
                if secure:
                    cookies = headers.getall("set-cookie", [])
                    if cookies:
                        del headers["set-cookie"]
                        for cookie in cookies:
                            headers.add("set-cookie", cookie if "secure" in cookie.lower() else cookie + "; Secure")
            await send(message)

        await next_app(scope, receive, send_with_headers)
