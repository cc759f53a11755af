"""The audit trail: who did what to whom, when and from where.

Rotations, revocations, disconnects and commands injected from the dashboard are
recorded here so an operator can answer "who did this?" at 3 a.m. Events hold no
secrets: an injected message is recorded as its SHA-256, a token by name and
version only. The trail is bounded; the memory implementation is the embedded
default, a Redis list (shared by every instance) is used when Redis is configured.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["AuditEvent", "AuditLog", "MemoryAuditLog", "RedisAuditLog", "audit_admin_command", "message_digest"]

log = logging.getLogger(__name__)

#: Events kept; older ones are dropped first.
DEFAULT_CAPACITY = 1000


def message_digest(text: str) -> str:
    """What the trail keeps of an injected message: enough to match it, nothing to read."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited action. ``actor`` names who acted (``alice`` of ``admin_tokens/alice``) or the token
    (``ADMIN_TOKEN``), never a value."""

    action: str  # e.g. "token.rotate", "token.revoke", "client.disconnect", "command.send", "login"
    actor: str
    source: str  # remote address of the request
    target: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog(abc.ABC):
    """Append-only, bounded, newest first when read."""

    @abc.abstractmethod
    async def record(self, event: AuditEvent) -> None: ...

    @abc.abstractmethod
    async def recent(self, limit: int = 100, action_prefix: str = "") -> list[AuditEvent]:
        """The newest ``limit`` events whose action starts with ``action_prefix``."""


class MemoryAuditLog(AuditLog):
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._events: deque[AuditEvent] = deque(maxlen=capacity)

    async def record(self, event: AuditEvent) -> None:
        self._events.append(event)

    async def recent(self, limit: int = 100, action_prefix: str = "") -> list[AuditEvent]:
        matching = [e for e in reversed(self._events) if e.action.startswith(action_prefix)]
        return matching[:limit]


class RedisAuditLog(AuditLog):
    """The trail in a Redis list shared by every instance (``wsb:audit``), newest first, trimmed to ``capacity``."""

    KEY = "wsb:audit"

    def __init__(self, redis: Any, capacity: int = DEFAULT_CAPACITY) -> None:
        self.redis = redis  # a redis.asyncio.Redis
        self.capacity = capacity

    async def record(self, event: AuditEvent) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self.KEY, json.dumps(event.as_dict()))
            pipe.ltrim(self.KEY, 0, self.capacity - 1)
            await pipe.execute()

    async def recent(self, limit: int = 100, action_prefix: str = "") -> list[AuditEvent]:
        events = []
        for raw in await self.redis.lrange(self.KEY, 0, self.capacity - 1):
            event = AuditEvent(**json.loads(raw))
            if event.action.startswith(action_prefix):
                events.append(event)
                if len(events) >= limit:
                    break
        return events


async def audit_admin_command(
    audit: AuditLog | None, actor: str, role: str, source: str, target: str, message: str, status: Any, via: str
) -> None:
    """Record a command sent with the admin token through the API or MCP as ``command.send``, as the dashboard does.

    SECURITY.md's advice for a leaked admin token is to review these events, so every channel the
    admin token can send through records one. A failure to record is logged, never the caller's error:
    the command has been sent.
    """
    if audit is None or role != "admin":
        return
    event = AuditEvent(
        "command.send", actor, source, target, {"message": message_digest(message), "status": status, "via": via}
    )
    try:
        await audit.record(event)
    except Exception:
        log.exception("Could not store audit event %s", event.as_dict())
