"""Rotation, revocation and eviction: the token service the CLI and the dashboard call.

On ``app.state.token_service``. It keeps the store fresh (interval, plus Redis
notifications from any instance), closes connections whose token version is no
longer allowed with 4011 ``TOKEN_EXPIRED`` (at the end of a grace window, or at
once on revocation), teaches the log filter every new value, and records every
rotation and revocation in the audit trail. ``wsbridge tokens`` builds one without
connections of its own to rotate from a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from .. import metrics
from ..audit import AuditEvent, AuditLog
from ..core.protocol import CloseCode
from ..logs import learn_secrets
from ..registry import LocalConnections
from ..settings import Settings
from .base import RotationUnavailable, TokenStore
from .notify import TokenNotifier

__all__ = ["TokenService", "new_token"]

log = logging.getLogger(__name__)

Presence = Callable[[], Awaitable[list[dict[str, Any]]]]


def new_token() -> str:
    """256 random bits, URL-safe: valid in a header, a ``.env`` line and a subprotocol entry."""
    return secrets.token_urlsafe(32)


class TokenService:
    def __init__(
        self,
        settings: Settings,
        store: TokenStore,
        audit: AuditLog,
        *,
        local: LocalConnections | None = None,
        notifier: TokenNotifier | None = None,
        presence: Presence | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.audit = audit
        #: This instance's connections (None in ``wsbridge tokens``, which holds none).
        self.local = local
        self.notifier = notifier
        self._presence = presence
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        store.on_change(self._store_changed)

    def _store_changed(self) -> None:
        learn_secrets(self.store.secret_values())
        self._changed.set()

    # --- running inside the appliance ----------------------------------------------------

    async def start(self) -> None:
        learn_secrets(self.store.secret_values())
        loop = asyncio.get_running_loop()
        if self.local is not None:
            self._tasks.append(loop.create_task(self._enforce(), name="tokens-enforce"))
        if self.store.rotatable:
            self._tasks.append(loop.create_task(self._poll(), name="tokens-refresh"))
            if self.notifier is not None:
                self._tasks.append(loop.create_task(self.notifier.listen(self.store.refresh), name="tokens-notify"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.token_refresh_seconds)
            await self.store.refresh()

    async def _enforce(self) -> None:
        """Evict when the valid set changes and when a grace window ends."""
        while True:
            self._changed.clear()
            self.enforce()
            expiry = self.store.next_expiry()
            wait = None if expiry is None else max(0.0, expiry - self.store.clock()) + 0.005
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    def enforce(self) -> int:
        """Close local connections whose token version is no longer allowed; how many were closed."""
        if self.local is None:
            return 0
        closed = 0
        for name, version in self.local.grants():
            if not self.store.connection_allowed(name, version):
                count = self.local.evict(name, version, CloseCode.TOKEN_EXPIRED)
                metrics.TOKEN_EVICTIONS.inc(count)
                log.info("Closed %d connection(s) opened with %s version %d (expired or revoked)", count, name, version)
                closed += count
        return closed

    # --- status ----------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Every token: versions, rotation time, grace end, fingerprints, this instance's connections per version."""
        local = self.local.grants() if self.local is not None else Counter()
        return [self._with_counts(entry, local) for entry in self.store.status()]

    async def cluster_status(self) -> list[dict[str, Any]]:
        """As :meth:`status`, counting connections on every instance (presence); local only if that fails."""
        counts: Counter[tuple[str, int]] = Counter()
        scope = "cluster"
        try:
            if self._presence is None:
                raise RuntimeError("no presence source")
            for record in await self._presence():
                if record.get("token") is not None:
                    counts[(record["token"], int(record["token_version"]))] += 1
        except Exception as exc:  # Counts are informative; the versions are what status is for.
            log.warning("Connection counts unavailable (%s)", exc)
            counts = self.local.grants() if self.local is not None else Counter()
            scope = "local" if self.local is not None else "unavailable"
        return [{**self._with_counts(entry, counts), "connections_scope": scope} for entry in self.store.status()]

    @staticmethod
    def _with_counts(entry: dict[str, Any], counts: Counter[tuple[str, int]]) -> dict[str, Any]:
        by_version = {
            str(version): n for (name, version), n in sorted(counts.items()) if name == entry["name"] and n > 0
        }
        return {**entry, "connections": by_version}

    # --- rotation and revocation -------------------------------------------------------------

    def rotation_unavailable(self) -> str | None:
        """Why rotation cannot be done here, or None: the dashboard hides its buttons and says why."""
        if not self.store.rotatable:
            return "rotation needs TOKEN_STORE=ssm; with the env store, change the token in .env and restart"
        if not self.settings.token_rotation_enabled:
            return "token rotation is disabled: set TOKEN_ROTATION_ENABLED=true"
        return None

    def _check_rotatable(self) -> Any:
        reason = self.rotation_unavailable()
        if reason is not None:
            raise RotationUnavailable(reason)
        return self.store

    async def rotate(self, name: str, actor: str, source: str, *, keep_connections: bool = False) -> str:
        """Give ``name`` a new random value (returned once, never stored elsewhere); the old one enters its grace window."""
        store = self._check_rotatable()
        value = new_token()
        version = await asyncio.to_thread(store.write_rotation, name, value, keep_connections)
        # Recorded as soon as SSM holds it: a failure to spread the news must not lose the event.
        await self._record(
            "token.rotate",
            actor,
            source,
            name,
            {
                "version": version,
                "grace_seconds": self.settings.token_grace_seconds,
                "keep_connections": keep_connections,
            },
        )
        await self._announce(name, "rotate")
        log.info("Rotated %s to version %d (by %s from %s)", name, version, actor, source)
        return value

    async def revoke(self, name: str, actor: str, source: str) -> int | None:
        """End ``name``'s grace window now, everywhere, closing the previous version's connections with 4011."""
        store = self._check_rotatable()
        version = await asyncio.to_thread(store.end_grace, name)
        await self._record("token.revoke", actor, source, name, {"version": version})
        await self._announce(name, "revoke")
        log.info("Revoked the previous version of %s (%s) (by %s from %s)", name, version, actor, source)
        return version

    async def _announce(self, name: str, event: str) -> None:
        # The change is in SSM: never fail (and lose a new value) here; the refresh interval catches up.
        if not await self.store.refresh():
            log.warning("The %s of %s is stored, but this process could not re-read the store", event, name)
        if self.notifier is not None:
            await self.notifier.publish(name, event)

    async def _record(self, action: str, actor: str, source: str, target: str, detail: dict[str, Any]) -> None:
        event = AuditEvent(action, actor, source, target, detail)
        try:
            await self.audit.record(event)
        except Exception:  # The change is done; keep the event in the log rather than lose it.
            log.exception("Could not store audit event %s", event.as_dict())
