"""What an in-process caller (the HTTP API, the MCP tools, the dashboard) learns about its command."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from .. import metrics
from ..core.protocol import ErrorCode

__all__ = ["HTTP_CONTROLLER", "HTTP_STATUS", "IN_PROCESS", "OUTCOMES", "Outcome", "Waiter", "rate_limited", "too_large"]

#: The controller name HTTP commands carry (v2 clients see it as "from").
HTTP_CONTROLLER = "http"

#: How the waiter keys of in-process callers (HTTP, MCP, dashboard) start; never a connection's key (hex).
IN_PROCESS = "h:"

#: Bound once: a label lookup costs more than the increment (as in metrics.py).
OUTCOMES = {
    name: metrics.COMMAND_OUTCOMES.labels(outcome=name) for name in ("delivered", "queued", "replied", "timeout")
}


@dataclass(slots=True)
class Outcome:
    """What an HTTP caller learns: an HTTP status and a JSON body."""

    http_status: int
    body: dict[str, Any]


@dataclass(slots=True)
class Waiter:
    """An HTTP request (or another in-process caller) waiting for one command's outcome."""

    future: asyncio.Future[Outcome]
    want_reply: bool
    target: str


def rate_limited(wait: float) -> Outcome:
    """Over the controller rate limit shared by every in-process caller: retry in ``wait`` seconds."""
    body = {
        "error": ErrorCode.RATE_LIMITED.value,
        "detail": "too many commands; retry later",
        "retry_after_ms": max(1, round(wait * 1000)),
    }
    return Outcome(429, body)


def too_large(limit: int) -> Outcome:
    body = {"error": ErrorCode.MESSAGE_TOO_LARGE.value, "detail": f"message exceeds {limit} bytes", "limit": limit}
    return Outcome(413, body)


#: The HTTP status of each error code ("" is a reply).
HTTP_STATUS = {
    "": 200,
    ErrorCode.TARGET_OFFLINE.value: 404,
    ErrorCode.INVALID_TARGET.value: 422,
    ErrorCode.INVALID_MESSAGE.value: 422,
    ErrorCode.MESSAGE_TOO_LARGE.value: 413,
    ErrorCode.RATE_LIMITED.value: 429,
    ErrorCode.DELIVERY_FAILED.value: 503,
    ErrorCode.DUPLICATE_ID.value: 409,
    ErrorCode.QUEUE_FULL.value: 409,
    ErrorCode.TOO_MANY_KEYS.value: 429,
    ErrorCode.TARGET_NOT_CLIENT.value: 422,
}
