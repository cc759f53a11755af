"""Each client's recent commands, cluster-wide: the adapter around :mod:`appliance.core.recent`.

Every instance keeps the logs of the clients it holds in memory, on their connections
(made at a client's first command, so idle clients cost nothing), and those of clients
that left for ``RECENT_COMMANDS_TTL_SECONDS``. A reader asks the instances that hold or
recently held the id over the broker's per-instance channel (event ``c``, answered with
``C``) and merges the answers.

Why ask rather than flush the logs to Redis (as the connect history is): the message path
then pays one append and never a Redis write, whatever the traffic (a broadcast to 10,000
clients would otherwise rewrite 10,000 lists each second), and nothing is encoded until
somebody looks. The price: a log lives as long as its instance (gone on restart,
unreadable while that instance is down; the reader names the instances that did not answer).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from .brokers.base import BrokerUnavailable
from .commands import Event, encode_event
from .core.recent import ClosedLogs, CommandLog

if TYPE_CHECKING:
    from .relay import Connection, Relay

__all__ = ["QUERY_SECONDS", "RecentCommands"]

#: How long a reader waits for another instance's part of a client's recent commands.
QUERY_SECONDS = 1.0

_encoder = msgspec.json.Encoder()


class RecentCommands:
    """This instance's part: the logs of its clients, and questions to the other instances."""

    def __init__(self, relay: Relay) -> None:
        settings = relay.settings
        self.relay = relay
        self.size = settings.recent_commands_per_client  # 0: not recorded
        self.max_chars = settings.recent_commands_max_chars
        self.ttl = settings.recent_commands_ttl_seconds
        self._closed = ClosedLogs(settings.recent_commands_max_closed, self.ttl)
        self._questions: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._seq = itertools.count()

    # --- the holding instance -----------------------------------------------------------

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
        conn = self.relay.local.get(client_id)
        found = conn.recent if conn is not None else None
        if found is None:
            found = self._closed.get(client_id, now)
        if found is None:
            return []
        instance = self.relay.instance
        return [{**entry, "instance": instance} for entry in found.view(now, limit)]

    # --- the reader ----------------------------------------------------------------------

    async def read(
        self, client_id: str, history: Iterable[dict[str, Any]] = (), timeout: float = QUERY_SECONDS
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """``client_id``'s recent commands across the cluster, newest first, and the instances that did not answer.

        Asks this instance, the one holding the id now, and those where one of its
        connections (``history``, its connect history) closed recently enough to still keep
        its log; never more than ``RECENT_COMMANDS_PER_CLIENT``.
        """
        if not self.size:
            return [], []
        relay = self.relay
        entries = self.local(client_id, self.size)
        cutoff = time.time() - self.ttl
        instances = {
            h["instance"]
            for h in history
            if h.get("instance") and datetime.fromisoformat(h["closed_at"]).timestamp() >= cutoff
        }
        try:
            owner = await relay.broker.owner_of(client_id)
        except BrokerUnavailable:
            owner = None
        if owner is not None:
            instances.add(owner.instance)
        instances.discard(relay.instance)
        ordered = sorted(instances)
        answers = await asyncio.gather(*(self._ask(i, client_id, timeout) for i in ordered))
        silent = []
        for instance, answer in zip(ordered, answers, strict=True):
            if answer is None:
                silent.append(instance)
            else:
                entries.extend(answer)
        entries.sort(key=lambda e: e["at"], reverse=True)
        return entries[: self.size], silent

    async def _ask(self, instance: str, client_id: str, timeout: float) -> list[dict[str, Any]] | None:
        key = f"r{next(self._seq)}"
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._questions[key] = future
        try:
            question = Event("c", key, target=client_id, sender=self.relay.instance, count=self.size)
            self.relay.broker.send_to_instance(instance, encode_event(question))
            async with asyncio.timeout(timeout):
                return await future
        except (TimeoutError, BrokerUnavailable):
            return None
        finally:
            self._questions.pop(key, None)

    def event(self, event: Event) -> None:
        """``c``: another instance asks for an id's log; ``C``: the answer to one of our questions."""
        if event.kind == "c":
            entries = self.local(event.target, event.count or None)
            answer = Event("C", event.owner, message=_encoder.encode(entries).decode())
            self.relay.broker.send_to_instance(event.sender, encode_event(answer))
            return
        future = self._questions.get(event.owner)
        if future is not None and not future.done():
            try:
                future.set_result(msgspec.json.decode(event.message))
            except msgspec.DecodeError:
                future.set_result([])
