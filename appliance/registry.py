"""This instance's open connections, found by id, by connection key, by role and by group.

The relay adds and removes connections as they open and close; the command service, the
recent-commands log, the token service and the broker's presence read them here. Nothing
here awaits or talks to the broker: it is the one place that knows which sockets this
instance holds.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import metrics
from .connections import Connection
from .core.protocol import CloseCode, Role

__all__ = ["LocalConnections"]


class LocalConnections:
    """Open connections of this instance, with the indexes routing needs."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        #: The registered holder of each id (one per id on this instance).
        self.by_id: dict[str, Connection] = {}
        self.controllers: set[Connection] = set()
        self._groups: dict[str, set[Connection]] = {}
        self._by_key: dict[str, Connection] = {}
        #: The open connection with this conn_key, or None (the command service's senders). The dict's
        #: own ``get``: called for every status and reply frame, and a method around it is a Python frame.
        self.connection: Callable[[str], Connection | None] = self._by_key.get
        # Moves on every connect and leave (never per message): the dashboard's cheap "list changed" test.
        self.membership = 0
        self.epoch = uuid.uuid4().hex[:8]  # Tells a restarted instance's counter from its previous life.
        # Frames written to connections that are gone, by role; live ones are summed at scrape
        # time from their sessions' counts, so the write path pays nothing for the metric.
        self._sent_by_gone = {Role.CONTROLLER.value: 0, Role.CLIENT.value: 0}

    def __len__(self) -> int:
        return len(self._by_key)

    def all(self) -> list[Connection]:
        return list(self._by_key.values())

    def add(self, conn: Connection) -> None:
        """``conn`` holds its id here now (the relay closed any older holder first)."""
        self.by_id[conn.client_id] = conn
        self._by_key[conn.conn_key] = conn
        self.membership += 1
        if conn.role is Role.CONTROLLER:
            self.controllers.add(conn)
        for group in conn.groups:
            self._groups.setdefault(group, set()).add(conn)
        metrics.CONNECTIONS.labels(role=conn.role.value).inc()

    def remove(self, conn: Connection) -> tuple[bool, bool]:
        """Forget ``conn``: (it was registered, it was its id's holder here)."""
        if self._by_key.pop(conn.conn_key, None) is None:
            return False, False
        self.membership += 1
        self.controllers.discard(conn)
        for group in conn.groups:
            members = self._groups.get(group)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self._groups[group]
        holder = self.by_id.get(conn.client_id) is conn
        if holder:
            del self.by_id[conn.client_id]
        metrics.CONNECTIONS.labels(role=conn.role.value).dec()
        self._sent_by_gone[conn.role.value] += conn.session.messages_out
        return True, holder

    # --- lookups ---------------------------------------------------------------------------

    def local_client(self, client_id: str) -> Connection | None:
        """The open client connection holding ``client_id`` here, or None."""
        conn = self.by_id.get(client_id)
        return conn if conn is not None and conn.role is Role.CLIENT and conn.close_code is None else None

    def local_clients(self, group: str | None) -> list[Connection]:
        """Local clients, or the local members of ``group``."""
        if group is None:
            return [c for c in self.by_id.values() if c.role is Role.CLIENT and c.close_code is None]
        return [c for c in self._groups.get(group, ()) if c.close_code is None]

    def disconnect_local(self, client_id: str, code: int | str) -> bool:
        """Close the local connection holding ``client_id`` with ``code``; False if there is none here."""
        conn = self.by_id.get(client_id)
        if conn is None or conn.close_code is not None:
            return False
        metrics.CLOSED_BY_RELAY.labels(reason="disconnected").inc()
        conn.close(CloseCode(int(code)))
        return True

    def deliver_to_controllers(self, frame: str) -> None:
        for conn in self.controllers:
            conn.deliver(frame)

    # --- presence ----------------------------------------------------------------------------

    def presence_records(self) -> list[dict[str, Any]]:
        return [conn.presence_record(self.instance) for conn in self._by_key.values() if conn.owner is not None]

    def presence_summary(self) -> dict[str, Any]:
        """This instance's counters and membership version, without building a record per connection."""
        clients = messages_in = messages_out = 0
        for conn in self._by_key.values():
            session = conn.session
            messages_in += session.messages_in
            messages_out += session.messages_out
            if conn.role is Role.CLIENT:
                clients += 1
        connections = len(self._by_key)
        return {
            "instance": self.instance,
            "epoch": self.epoch,
            "membership": self.membership,
            "connections": connections,
            "clients": clients,
            "controllers": connections - clients,
            "messages_in": messages_in,
            "messages_out": messages_out,
        }

    def presence_record(self, client_id: str) -> dict[str, Any] | None:
        conn = self.by_id.get(client_id)
        return conn.presence_record(self.instance) if conn is not None and conn.owner is not None else None

    # --- metrics, scraped ---------------------------------------------------------------------

    def frames_sent(self) -> dict[str, float]:
        """Frames written so far by receiving role (wsbridge_frames_sent_total, summed when scraped)."""
        totals: dict[str, float] = dict(self._sent_by_gone)
        for conn in self._by_key.values():
            totals[conn.role.value] += conn.session.messages_out
        return totals

    def fullest_queue(self) -> tuple[int, int]:
        """(frames, characters) waiting in the fullest send queue, when scraped."""
        return max((conn.queued() for conn in self._by_key.values()), default=(0, 0))

    # --- tokens (appliance/tokens/service.py) ---------------------------------------------------

    def grants(self) -> Counter[tuple[str, int]]:
        """Local connections by the token (name, version) that opened them."""
        return Counter((c.grant.name, c.grant.version) for c in self._by_key.values() if c.grant is not None)

    def evict(self, token_name: str, version: int, code: CloseCode) -> int:
        """Close every local connection opened with this token version (expired or revoked)."""
        victims = [
            conn
            for conn in self._by_key.values()
            if conn.grant is not None and conn.grant.name == token_name and conn.grant.version == version
        ]
        for conn in victims:
            conn.close(code)
        return len(victims)
