"""The command service's interface for in-process callers: the HTTP API, the MCP tools, the dashboard.

A base of :class:`~appliance.commands.service.CommandService` (which owns the state it uses):
each call waits on a future of its own, keyed by an ``h:`` waiter, and its command can be
followed up by its id (:mod:`.followup`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from functools import partial
from typing import Any

from ..brokers.base import Broker
from ..core.events import Disconnect, encode_event
from ..core.protocol import CloseCode, ProtocolError
from ..core.protocol_v2 import CommandId, Request, TargetKind, TimeoutPolicy, request_from_fields
from ..core.requests import PendingTable, Routed
from ..registry import LocalConnections
from ..settings import Settings
from .followup import UNNAMED, Followups
from .idempotency import IdempotentSends, fingerprint
from .outcome import HTTP_CONTROLLER, IN_PROCESS, Outcome, Waiter, rate_limited, too_large

__all__ = ["InProcessCallers", "disconnect_anywhere"]


class InProcessCallers:
    """``send_command``, ``parse`` and ``disconnect``, on the state of the command service."""

    settings: Settings
    broker: Broker
    local: LocalConnections
    policy: TimeoutPolicy
    pending: PendingTable
    followups: Followups
    idempotent: IdempotentSends
    budgets: Any
    _waiters: dict[str, Waiter]
    _queueable: dict[tuple[str, CommandId], tuple[str, Routed]]
    _loop: asyncio.AbstractEventLoop | None
    _http_seq: itertools.count[int]
    _id_prefix: str
    _id_seq: itertools.count[int]

    def submit(self, waiter: str, controller: str, request: Request) -> None:
        raise NotImplementedError

    def parse(self, fields: dict[str, Any]) -> Request | ProtocolError:
        return request_from_fields(fields, self.policy)

    async def send_command(
        self,
        target: str,
        message: str,
        *,
        command_id: CommandId | None = None,
        wait_ms: int | None = None,
        timeout_ms: int | None = None,
        queue: bool = False,
        controller: str = HTTP_CONTROLLER,
        idempotency_key: str | None = None,
        budget: str = "",
        owner: str | None = None,
    ) -> Outcome:
        """Send one command and wait for its outcome (the reply too, with ``wait_ms``).

        Returns the HTTP status and body of ``POST /api/v1/commands``: 200 replied, 202
        delivered or queued, 504 timeout, 404 offline, 409 duplicate id or queue full,
        413 too large, 422 invalid, 503 when the target's instance cannot be reached.
        With ``idempotency_key`` a repeat gets the first outcome (commands/idempotency.py); its id follows it up.
        ``controller`` names the caller (recent commands, v2 ``from``); ``budget`` is its rate-limit bucket;
        ``owner`` (a named token's caller, None for the unnamed tokens) is who may follow the command up.
        """
        if command_id is None:
            # Unique across instances and restarts (the offline queue's de-duplication is by (controller, id)):
            # this process's random prefix and a counter. A random id per command cost a getrandom syscall.
            command_id = f"{controller}-{self._id_prefix}{next(self._id_seq):x}"
        if idempotency_key is not None:  # A repeat waits as long as the first command may.
            own_ms = next((ms for ms in (wait_ms, timeout_ms) if ms is not None), self.policy.default_ms)
            once = partial(self.send_command, target, message, command_id=command_id, wait_ms=wait_ms)
            once = partial(once, timeout_ms=timeout_ms, queue=queue, controller=controller, budget=budget, owner=owner)
            key = f"{controller}:{idempotency_key}"  # Within its caller's budget (named token; the unnamed together).
            same = (owner or UNNAMED, key, fingerprint(target, message, queue), own_ms / 1000 + 1.0)
            return await self.followups.caller_of(command_id, self.idempotent.send(*same, once), owner)
        wait = self.budgets.try_take(budget, time.time())
        if wait > 0:
            return rate_limited(wait)
        fields: dict[str, Any] = {"target": target, "message": message, "id": command_id, "queue": queue}
        effective = wait_ms if wait_ms is not None else timeout_ms
        if effective is not None:
            fields["timeout_ms"] = effective
        if len(message.encode()) > self.settings.max_message_bytes:
            return too_large(self.settings.max_message_bytes)
        request = self.parse(fields)
        if isinstance(request, ProtocolError):
            return Outcome(422, {"error": request.code.value, "detail": request.detail, **dict(request.extra)})
        waiter = f"{IN_PROCESS}{next(self._http_seq)}"  # Unique in this instance, where outcomes come back.
        future: asyncio.Future[Outcome] = (self._loop or asyncio.get_running_loop()).create_future()
        self._waiters[waiter] = Waiter(future, wait_ms is not None, target)
        if request.kind is TargetKind.CLIENT:
            self.followups.opened(waiter, command_id, target, message, request.timeout_ms, owner)
        try:
            self.submit(waiter, controller, request)
            if request.kind is TargetKind.CLIENT:
                return await self.followups.outcome_of(waiter, command_id, future, owner)
            return await future
        finally:
            self._waiters.pop(waiter, None)
            if request.id is not None:  # This waiter's only entry (a broadcast opens none): no scan of them all.
                self.pending.finish(waiter, request.id)
                self._queueable.pop((waiter, request.id), None)

    async def disconnect(self, client_id: str, code: int = CloseCode.DISCONNECTED) -> bool:
        """Close ``client_id``'s connection wherever it is (admin action); False if it is not connected."""
        return await disconnect_anywhere(self.local, self.broker, client_id, code)


async def disconnect_anywhere(local: LocalConnections, broker: Broker, client_id: str, code: int) -> bool:
    if local.disconnect_local(client_id, code):
        return True
    holder = await broker.owner_of(client_id)
    if holder is None:
        return False
    broker.send_to_instance(holder.instance, encode_event(Disconnect(client_id, str(int(code)))))
    return True
