"""The broker contract: how an instance reaches connections anywhere in the cluster.

One contract, two backends (:mod:`.memory` for one process, :mod:`.redis` for
many), one test suite run against both. The relay owns the local connections
and implements :class:`Inbox`; the broker owns everything cluster-wide:
id ownership (duplicate resolution), routing, and presence.

Every :meth:`Broker.send` ends in exactly one outcome, reported through its
``on_result`` callback: ``on_result(None, "")`` once the text was handed to the
queue of the target's live connection, or ``on_result(code, detail)`` with the
error code the controller gets (``target_offline``, ``target_not_client``,
``delivery_failed``). The relay turns a failure into an error frame; status frames
(``delivered``) can be built on the success call without touching the brokers.

Errors: :class:`BrokerUnavailable` when the backend cannot be reached (the
relay refuses new connections with 1013 and reports not-ready), and
:class:`BrokerNotStarted` when a backend is used before :meth:`Broker.start`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.keybudget import KeyBudget, TooManyKeys
from ..core.newids import WindowCount
from ..core.protocol import ErrorCode, Role
from ..core.requests import Enqueued, Routed

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerNotStarted",
    "BrokerUnavailable",
    "Claim",
    "Inbox",
    "KeyBudget",
    "OnResult",
    "Owner",
    "TooManyKeys",
    "failure_detail",
]


class BrokerError(RuntimeError):
    """Base class of broker errors."""


class BrokerUnavailable(BrokerError):
    """The backend cannot be reached right now; the reason is safe to show (no credentials)."""


class BrokerNotStarted(BrokerError):
    """A broker was used before ``await broker.start(inbox)``."""


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds an id: a connection of a role on an instance. Higher generations are newer claims.

    The role is part of ownership so that a connection of the other role can never
    displace the holder (a client token must not take over a controller's id).
    """

    instance: str
    conn_key: str
    generation: int
    role: Role

    def encode(self) -> str:
        return f"{self.generation}|{self.role.value}|{self.instance}|{self.conn_key}"

    @classmethod
    def decode(cls, value: str) -> Owner:
        generation, role, instance, conn_key = value.split("|", 3)
        return cls(instance, conn_key, int(generation), Role(role))


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming an id: accepted or not, and whom it displaced or collided with.

    ``role_conflict`` is true when the claim was refused because a connection of the
    other role holds the id (whatever the duplicate policy).
    """

    accepted: bool
    owner: Owner | None
    previous: Owner | None
    role_conflict: bool = False


#: The one outcome of a send: ``(None, "")`` when the text was queued on the target's live
#: connection, else the error code the controller gets and a human detail. Called exactly once.
OnResult = Callable[[ErrorCode | None, str], None]


#: Details of the errors the inbox reports.
_DETAILS = {
    ErrorCode.TARGET_OFFLINE: "{} is not connected",
    ErrorCode.TARGET_NOT_CLIENT: "{} is a controller; controllers send to clients only",
    ErrorCode.DELIVERY_FAILED: "{} is disconnecting; the message was not delivered",
}


def failure_detail(code: ErrorCode, target: str) -> str:
    """The human detail of an error the inbox reported about ``target``."""
    return _DETAILS.get(code, "{}: delivery failed").format(target)


class Inbox(Protocol):
    """What a broker hands to the local instance (implemented by the relay)."""

    def deliver(self, client_id: str, text: str, sender: str = "") -> ErrorCode | None:
        """Queue ``text`` from the controller ``sender`` for the local client ``client_id``: None if queued.

        ``TARGET_OFFLINE`` when no local connection holds the id, ``TARGET_NOT_CLIENT``
        when a controller holds it, ``DELIVERY_FAILED`` when the connection is closing.
        """

    def deliver_routed(self, client_id: str, routed: Routed) -> ErrorCode | None:
        """A command with an id for the local client ``client_id``; the same outcomes as :meth:`deliver`.

        None means the command service took it (handed over, or waiting its turn); it
        reports the later outcomes on the sender's instance channel itself.
        """

    def instance_event(self, payload: bytes) -> None:
        """A message on this instance's channel (a command outcome, an order) from any instance."""

    def fan_in(self, payload: bytes) -> None:
        """A broadcast or group command from any instance, for the local clients."""

    def deliver_to_controllers(self, frame: str) -> None:
        """Queue ``frame`` for every local controller."""

    def replaced(self, client_id: str, owner: Owner) -> None:
        """``owner`` now holds ``client_id``: close any older local connection with that id."""

    def presence_records(self) -> list[dict[str, Any]]:
        """The local connections as presence records."""

    def presence_record(self, client_id: str) -> dict[str, Any] | None:
        """The presence record of the local connection holding ``client_id``, if any."""

    def presence_summary(self) -> dict[str, Any]:
        """The local counters: ``instance``, ``epoch``, ``membership`` (moves on every connect and
        leave), ``connections``, ``clients``, ``controllers``, ``messages_in``, ``messages_out``."""


class Broker(abc.ABC):
    """Cluster-wide routing, id ownership and presence."""

    name: str

    @abc.abstractmethod
    async def start(self, inbox: Inbox) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def claim(self, client_id: str, instance: str, conn_key: str, role: Role, reject_if_taken: bool) -> Claim:
        """Take ownership of ``client_id`` for a connection of ``role`` and start receiving its messages.

        A live owner of the other role always wins (``role_conflict``): one id is never
        held by a controller and a client at once, though it may change role once freed.
        With ``reject_if_taken`` a live owner of the same role wins and the claim is
        refused; otherwise the claim wins and the previous owner is told it was replaced.
        If the caller is cancelled, an ownership that was taken is given up again.
        """

    @abc.abstractmethod
    async def release(self, client_id: str, owner: Owner) -> None:
        """Give up ``client_id`` if ``owner`` still holds it; a newer owner is never disturbed."""

    @abc.abstractmethod
    def send(self, target: str, text: str, on_result: OnResult, sender: str = "") -> None:
        """Deliver ``text`` from the controller ``sender`` to the client ``target`` wherever it is, in order.

        ``on_result`` is called exactly once, possibly before ``send`` returns (see
        :data:`OnResult`): the caller learns the outcome of every message.
        """

    @abc.abstractmethod
    def send_to_controllers(self, frame: str) -> None:
        """Deliver ``frame`` to every controller in the cluster."""

    # --- commands with an id (protocol version 2) ------------------------------------------

    @abc.abstractmethod
    def send_routed(self, target: str, routed: Routed, on_result: OnResult) -> None:
        """Like :meth:`send`, in order with it, but the target's inbox gets :meth:`Inbox.deliver_routed`."""

    @abc.abstractmethod
    def send_to_instance(self, instance: str, payload: bytes) -> None:
        """Hand ``payload`` to ``instance``'s :meth:`Inbox.instance_event` (best effort: lost in an outage)."""

    @abc.abstractmethod
    async def fan_out(self, payload: bytes) -> int:
        """Hand ``payload`` to every instance's :meth:`Inbox.fan_in`; returns how many instances got it."""

    @abc.abstractmethod
    async def enqueue(self, target: str, routed: Routed, now: float, *, requeue: bool = False) -> Enqueued:
        """Keep ``routed`` for the absent ``target`` (bounded, expiring, never twice per (controller, id)).

        ``requeue``: it was taken from the queue but its client left before it was handed over,
        so its "delivered" mark does not refuse it.
        """

    @abc.abstractmethod
    async def take_queued(self, target: str, now: float) -> list[Routed]:
        """``target`` connected: its unexpired queued commands, oldest first, removed from the queue."""

    @abc.abstractmethod
    async def owner_of(self, client_id: str) -> Owner | None:
        """Who holds ``client_id`` now, anywhere in the cluster."""

    @abc.abstractmethod
    async def presence(self) -> list[dict[str, Any]]:
        """Every live connection in the cluster."""

    @abc.abstractmethod
    async def presence_summary(self) -> list[dict[str, Any]]:
        """Every instance's :meth:`Inbox.presence_summary`, in a few small reads (never one per connection).

        Its ``(instance, epoch, membership)`` triples change whenever :meth:`presence` gains or
        loses a connection, so a watcher reads this and the full list only when it moved.
        """

    # --- heartbeats and trends (appliance/heartbeat.py) ---------------------------------------

    @abc.abstractmethod
    def heartbeat(self, beat: dict[str, Any], trend: dict[str, Any] | None) -> None:
        """Publish this instance's heartbeat: its :meth:`presence_summary` entry carries ``beat``
        until the next one, and ``trend`` (a point of its rates, when there is one) joins the
        series :meth:`trends` reads. Never waits; the Redis broker writes it within ~0.2 s."""

    @abc.abstractmethod
    async def trends(self, instances: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The trend points (oldest first) that the other ``instances`` published, by instance;
        this instance keeps its own. Empty for one that published none."""

    # --- a presence record that changed while connected (a client's manifest) ----------------

    @abc.abstractmethod
    def presence_changed(self, client_id: str) -> None:
        """The local record of ``client_id`` changed while it stays connected: publish it (never waits).

        The memory broker reads records live; the Redis broker writes it within ~0.2 s.
        """

    async def presence_of(self, client_id: str) -> dict[str, Any] | None:
        """The presence record of the connection holding ``client_id`` anywhere, or None.

        The default reads all presence; backends with a cheaper way to find one record override it.
        """
        return next((r for r in await self.presence() if r["id"] == client_id), None)

    # --- connect history (appliance/core/history.py) ----------------------------------------

    @abc.abstractmethod
    def record_history(self, client_id: str, entry: dict[str, Any]) -> None:
        """Add a closed connection's entry to ``client_id``'s connect history, newest first.

        Never waits: called once per close, off the message path; the Redis broker writes it
        with the next presence write (a lost entry during an outage is retried, bounded).
        """

    @abc.abstractmethod
    async def history(self, client_id: str, limit: int) -> list[dict[str, Any]]:
        """``client_id``'s connect history across the cluster, newest first, at most ``limit`` entries."""

    # --- idempotency records (appliance/commands/idempotency.py) -----------------------------

    @abc.abstractmethod
    async def idempotency_claim(self, caller: str, key: str, record: str) -> str | None:
        """Store ``record`` under ``caller``'s ``key`` unless a record is there; return the one already there.

        Atomic cluster-wide: of two instances claiming the same key at once, exactly one gets None.
        Records are forgotten the broker's ``idempotency_window`` seconds after their last write.
        A new key beyond the caller's ``key_budget`` (core/keybudget.py) raises :class:`TooManyKeys`;
        a live key is never forgotten early.
        """

    @abc.abstractmethod
    async def idempotency_get(self, caller: str, key: str) -> str | None:
        """The record under ``caller``'s ``key``, None when there is none (or it expired)."""

    @abc.abstractmethod
    async def idempotency_set(self, caller: str, key: str, record: str) -> None:
        """Replace the record under ``key`` (the claimer settles it with the outcome; it then counts its size)."""

    @abc.abstractmethod
    async def idempotency_drop(self, caller: str, key: str) -> None:
        """Forget ``key``: the command never reached a client, so a retry may run it (its budget is freed)."""

    # --- command records (appliance/commands/followup.py) -------------------------------------

    @abc.abstractmethod
    async def record_put(self, owner: str, key: str, record: str) -> None:
        """Write ``record`` under ``key`` among ``owner``'s command records, atomically bounded.

        A record is forgotten ``idempotency_window`` seconds after its last write; an owner keeps
        at most ``records_per_owner``: beyond, the one written longest ago goes, in the same step.
        """

    @abc.abstractmethod
    async def record_get(self, owner: str, key: str) -> str | None:
        """``owner``'s record under ``key``, None when there is none (expired, or pushed out by newer ones)."""

    # --- admission records (appliance/gate.py) ----------------------------------------------

    @abc.abstractmethod
    async def id_known(self, client_id: str) -> bool:
        """Whether ``client_id`` is held now or has a connect history, anywhere in the cluster."""

    @abc.abstractmethod
    async def count_in_window(self, key: str, window: float) -> WindowCount:
        """Add one to the counter ``key``, cluster-wide; a counter lives ``window`` seconds from its first count."""

    @abc.abstractmethod
    async def put_ban(self, key: str, record: str, until: float) -> None:
        """Keep the ban ``record`` under ``key`` until the epoch time ``until`` (a later put replaces it)."""

    @abc.abstractmethod
    async def drop_ban(self, key: str) -> bool:
        """Lift the ban under ``key``; False if there was none."""

    @abc.abstractmethod
    async def bans(self, seen: int | None) -> tuple[int, dict[str, str] | None]:
        """The ban list's version and, unless it is still ``seen``, its unexpired records by key.

        The version moves on every put and drop, so a handshake reads one small value and the
        whole list only after a change.
        """

    @abc.abstractmethod
    def health(self) -> tuple[bool, str]:
        """(ready, reason): whether cluster-wide routing works now."""

    def describe(self) -> str:
        return self.name
