"""Each client's recent commands, cluster-wide: the reader around :mod:`appliance.core.recent`.

Every instance keeps the logs of the clients it holds in memory (appliance/recent_logs.py),
and those of clients that left for ``RECENT_COMMANDS_TTL_SECONDS``. A reader asks the instances that hold or
recently held the id over the broker's per-instance channel (:class:`~appliance.core.events.RecentAsk`, answered with
:class:`~appliance.core.events.RecentAnswer`) and merges the answers.

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
from typing import Any

import msgspec

from .brokers.base import Broker, BrokerUnavailable
from .core.events import RecentAnswer, RecentAsk, encode_event
from .recent_logs import RecentLogs

__all__ = ["QUERY_SECONDS", "RecentCommands"]

#: How long a reader waits for another instance's part of a client's recent commands.
QUERY_SECONDS = 1.0

_encoder = msgspec.json.Encoder()


class RecentCommands:
    """The reader: this instance's logs, and questions to the other instances that hold or held the id."""

    def __init__(self, instance: str, broker: Broker, logs: RecentLogs) -> None:
        self.instance = instance
        self.broker = broker
        self.logs = logs
        self._questions: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._seq = itertools.count()

    async def read(
        self, client_id: str, history: Iterable[dict[str, Any]] = (), timeout: float = QUERY_SECONDS
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """``client_id``'s recent commands across the cluster, newest first, and the instances that did not answer.

        Asks this instance, the one holding the id now, and those where one of its
        connections (``history``, its connect history) closed recently enough to still keep
        its log; never more than ``RECENT_COMMANDS_PER_CLIENT``.
        """
        size = self.logs.size
        if not size:
            return [], []
        entries = self.logs.local(client_id, size)
        cutoff = time.time() - self.logs.ttl
        instances = {
            h["instance"]
            for h in history
            if h.get("instance") and datetime.fromisoformat(h["closed_at"]).timestamp() >= cutoff
        }
        try:
            owner = await self.broker.owner_of(client_id)
        except BrokerUnavailable:
            owner = None
        if owner is not None:
            instances.add(owner.instance)
        instances.discard(self.instance)
        ordered = sorted(instances)
        answers = await asyncio.gather(*(self._ask(i, client_id, timeout) for i in ordered))
        silent = []
        for instance, answer in zip(ordered, answers, strict=True):
            if answer is None:
                silent.append(instance)
            else:
                entries.extend(answer)
        entries.sort(key=lambda e: e["at"], reverse=True)
        return entries[:size], silent

    async def _ask(self, instance: str, client_id: str, timeout: float) -> list[dict[str, Any]] | None:
        key = f"r{next(self._seq)}"
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._questions[key] = future
        try:
            question = RecentAsk(key, client_id, self.instance, self.logs.size)
            self.broker.send_to_instance(instance, encode_event(question))
            async with asyncio.timeout(timeout):
                return await future
        except (TimeoutError, BrokerUnavailable):
            return None
        finally:
            self._questions.pop(key, None)

    def event(self, event: RecentAsk | RecentAnswer) -> None:
        """Another instance asks for an id's log, or answers one of our questions."""
        if isinstance(event, RecentAsk):
            entries = self.logs.local(event.target, event.limit or None)
            answer = RecentAnswer(event.question, _encoder.encode(entries).decode())
            self.broker.send_to_instance(event.instance, encode_event(answer))
            return
        future = self._questions.get(event.question)
        if future is not None and not future.done():
            try:
                future.set_result(msgspec.json.decode(event.entries))
            except msgspec.DecodeError:
                future.set_result([])
