"""The broker contract: how an instance reaches connections anywhere in the cluster.

One contract, two backends (:mod:`.memory` for one process, :mod:`.redis` for
many), one test suite run against both. The relay owns the local connections
and implements :class:`Inbox`; the broker owns everything cluster-wide:
id ownership (duplicate resolution), routing, and presence.

Errors: :class:`BrokerUnavailable` when the backend cannot be reached (the
relay refuses new connections with 1013 and reports not-ready), and
:class:`BrokerNotStarted` when a backend is used before :meth:`Broker.start`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.protocol import ErrorCode

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerNotStarted",
    "BrokerUnavailable",
    "Claim",
    "Inbox",
    "OnFailure",
    "Owner",
]


class BrokerError(RuntimeError):
    """Base class of broker errors."""


class BrokerUnavailable(BrokerError):
    """The backend cannot be reached right now; the reason is safe to show (no credentials)."""


class BrokerNotStarted(BrokerError):
    """A broker was used before ``await broker.start(inbox)``."""


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds an id: a connection on an instance. Higher generations are newer claims."""

    instance: str
    conn_key: str
    generation: int

    def encode(self) -> str:
        return f"{self.generation}|{self.instance}|{self.conn_key}"

    @classmethod
    def decode(cls, value: str) -> Owner:
        generation, instance, conn_key = value.split("|", 2)
        return cls(instance, conn_key, int(generation))


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming an id: accepted or not, and whom it displaced or collided with."""

    accepted: bool
    owner: Owner | None
    previous: Owner | None


#: Called when a message cannot be delivered, with the error code and a human detail.
OnFailure = Callable[[ErrorCode, str], None]


class Inbox(Protocol):
    """What a broker hands to the local instance (implemented by the relay)."""

    def deliver(self, client_id: str, text: str) -> bool:
        """Queue ``text`` for the local connection ``client_id``; False if there is none."""

    def deliver_to_controllers(self, frame: str) -> None:
        """Queue ``frame`` for every local controller."""

    def replaced(self, client_id: str, owner: Owner) -> None:
        """``owner`` now holds ``client_id``: close any older local connection with that id."""

    def presence_records(self) -> list[dict[str, Any]]:
        """The local connections as presence records."""


class Broker(abc.ABC):
    """Cluster-wide routing, id ownership and presence."""

    name: str

    @abc.abstractmethod
    async def start(self, inbox: Inbox) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def claim(self, client_id: str, instance: str, conn_key: str, reject_if_taken: bool) -> Claim:
        """Take ownership of ``client_id`` and start receiving its messages.

        With ``reject_if_taken`` a live owner wins and the claim is refused;
        otherwise the claim wins and the previous owner is told it was replaced.
        """

    @abc.abstractmethod
    async def release(self, client_id: str, owner: Owner) -> None:
        """Give up ``client_id`` if ``owner`` still holds it; a newer owner is never disturbed."""

    @abc.abstractmethod
    def send(self, target: str, text: str, on_failure: OnFailure) -> None:
        """Deliver ``text`` to ``target`` wherever it is, in order; ``on_failure`` if it cannot."""

    @abc.abstractmethod
    def send_to_controllers(self, frame: str) -> None:
        """Deliver ``frame`` to every controller in the cluster."""

    @abc.abstractmethod
    async def presence(self) -> list[dict[str, Any]]:
        """Every live connection in the cluster."""

    @abc.abstractmethod
    def health(self) -> tuple[bool, str]:
        """(ready, reason): whether cluster-wide routing works now."""

    def describe(self) -> str:
        return self.name
