"""The logs of recent commands this instance keeps for its clients (appliance/core/recent.py holds one log).

A client's log lives on its connection, made at its first command so idle clients cost
nothing, and is kept for ``RECENT_COMMANDS_TTL_SECONDS`` after it leaves so a reconnect here
continues it. The relay and the command service append to it as commands reach the socket;
the recent-commands service (appliance/recent.py) reads it and asks the other instances.
"""

from __future__ import annotations

import time
from typing import Any

from .connections import Connection
from .core.recent import ClosedLogs, CommandLog
from .registry import LocalConnections
from .settings import Settings

__all__ = ["RecentLogs"]


class RecentLogs:
    """This instance's part of the recent-commands log: the logs of its clients, open or recently closed."""

    def __init__(self, settings: Settings, local: LocalConnections) -> None:
        self.local_connections = local
        self.size = settings.recent_commands_per_client  # 0: not recorded
        self.max_chars = settings.recent_commands_max_chars
        self.ttl = settings.recent_commands_ttl_seconds
        self._closed = ClosedLogs(settings.recent_commands_max_closed, self.ttl)

    def opened(self, conn: Connection, older: Connection | None) -> None:
        """A client took its id here: its log continues from the connection it replaces, or its last one here."""
        if self.size:
            conn.recent = (older.recent if older is not None else None) or self._closed.take(
                conn.client_id, time.time()
            )

    def closed(self, conn: Connection) -> None:
        """A client left: its log stays readable for a while."""
        if conn.recent is not None:
            self._closed.keep(conn.client_id, conn.recent, time.time())

    def log_for(self, conn: Connection) -> CommandLog | None:
        """``conn``'s log, made at its first command; None when commands are not recorded."""
        recent = conn.recent
        if recent is None and self.size:
            recent = conn.recent = CommandLog(self.size, self.max_chars)
        return recent

    def local(self, client_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """``client_id``'s recent commands as this instance recorded them, newest first."""
        now = time.time()
        conn = self.local_connections.by_id.get(client_id)
        found = conn.recent if conn is not None else None
        if found is None:
            found = self._closed.get(client_id, now)
        if found is None:
            return []
        instance = self.local_connections.instance
        return [{**entry, "instance": instance} for entry in found.view(now, limit)]
