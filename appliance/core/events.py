"""Messages between instances on the broker's per-instance channel and the fan-out channel. No I/O.

Two families, one Struct per kind (a msgspec tagged union, tag field ``kind``):

- **outcomes** of a command, for the instance its sender waits on (``waiter``: a controller
  connection's key or an HTTP waiter's): :class:`Delivered`, :class:`Replied`,
  :class:`Failed`, a broadcast's per-instance :class:`Counted`, and a version-2 client's reply
  to a broadcast whose sender waits (:class:`FanReplied`);
- **orders** for the instance that holds a client: :class:`Disconnect`, :class:`Drain` (hand
  over its queued commands), and the recent-commands question and answer
  (:class:`RecentAsk`, :class:`RecentAnswer`).

A :class:`FanOut` carries a broadcast or group command to every instance. The broker moves
their bytes and never looks inside. The encoded field names are those of the one-letter
``Event`` these replaced, so instances of both builds understand each other during a
rolling upgrade.
"""

from __future__ import annotations

import msgspec

from .protocol_v2 import CommandId

__all__ = [
    "Counted",
    "Delivered",
    "Disconnect",
    "Drain",
    "Failed",
    "FanOut",
    "FanReplied",
    "InstanceEvent",
    "Order",
    "Outcome",
    "RecentAnswer",
    "RecentAsk",
    "Replied",
    "decode_event",
    "decode_fan_out",
    "encode_event",
    "encode_fan_out",
]


class _Event(msgspec.Struct, frozen=True, omit_defaults=True, gc=False, tag_field="kind"):
    pass


# --- outcomes: to the instance where the command's sender waits ---------------------------------


class Delivered(_Event, tag="d", frozen=True):
    """The command reached its client's socket."""

    waiter: str = msgspec.field(name="owner")
    id: CommandId = ""
    target: str = ""


class Replied(_Event, tag="r", frozen=True):
    """The client answered: its reply goes to the command's sender only."""

    waiter: str = msgspec.field(name="owner")
    id: CommandId = ""
    client: str = msgspec.field(default="", name="sender")
    message: str = ""


class Failed(_Event, tag="e", frozen=True):
    """The command cannot reach its client; ``code`` is an :class:`~appliance.core.protocol.ErrorCode` value."""

    waiter: str = msgspec.field(name="owner")
    id: CommandId = ""
    target: str = ""
    code: str = ""
    detail: str = ""


class Counted(_Event, tag="n", frozen=True):
    """One instance's count of local clients a broadcast or group command reached."""

    fan_out: str = msgspec.field(name="owner")  # The FanOut's tag.
    id: CommandId = ""
    count: int = 0
    #: The version-2 receivers whose replies its sender waits for (only when it waits: FanOut.collect_ms).
    clients: tuple[str, ...] = ()


class FanReplied(_Event, tag="b", frozen=True):
    """A version-2 client's reply to a broadcast or group command whose sender waits for the replies."""

    fan_out: str = msgspec.field(name="owner")  # The FanOut's tag.
    id: CommandId = ""
    client: str = msgspec.field(default="", name="sender")
    message: str = ""


Outcome = Delivered | Replied | Failed | Counted | FanReplied


# --- orders: to the instance that holds a client ---------------------------------------------------


class Disconnect(_Event, tag="x", frozen=True):
    """Close the local connection holding ``target`` with ``code`` (an admin's disconnect)."""

    target: str = ""
    code: str = ""


class Drain(_Event, tag="q", frozen=True):
    """Hand ``target`` what is queued for it (it connected while a command was being queued)."""

    target: str = ""


class RecentAsk(_Event, tag="c", frozen=True):
    """Send ``target``'s recent commands (at most ``limit``) to ``instance``, for its ``question``."""

    question: str = msgspec.field(name="owner")
    target: str = ""
    instance: str = msgspec.field(default="", name="sender")
    limit: int = msgspec.field(default=0, name="count")


class RecentAnswer(_Event, tag="C", frozen=True):
    """The answer to ``question``: the commands as JSON (an instance formats them once, on request)."""

    question: str = msgspec.field(name="owner")
    entries: str = msgspec.field(default="", name="message")


Order = Disconnect | Drain | RecentAsk | RecentAnswer
InstanceEvent = Delivered | Replied | Failed | Counted | FanReplied | Disconnect | Drain | RecentAsk | RecentAnswer


class FanOut(msgspec.Struct, frozen=True, omit_defaults=True):
    """A broadcast or group command, sent to every instance; each counts its local receivers."""

    origin: str
    #: Its counts' key: the waiter's key and a sequence number (encoded as ``owner``, as before).
    tag: str = msgspec.field(name="owner")
    id: CommandId | None = msgspec.field()
    controller: str = msgspec.field()
    message: str = msgspec.field()
    group: str | None = msgspec.field()
    #: > 0: its sender waits this long for the version-2 receivers' replies (each instance
    #: remembers whom it handed the command to, and sends their replies back as FanReplied).
    collect_ms: int = msgspec.field(default=0, name="collect")


_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(InstanceEvent)
_fan_encoder = msgspec.json.Encoder()
_fan_decoder = msgspec.json.Decoder(FanOut)


def encode_event(event: InstanceEvent) -> bytes:
    return _event_encoder.encode(event)


def decode_event(payload: bytes | str) -> InstanceEvent:
    """Raises msgspec.DecodeError (msgspec.ValidationError included) on a malformed event."""
    event: InstanceEvent = _event_decoder.decode(payload)
    return event


def encode_fan_out(fan: FanOut) -> bytes:
    return _fan_encoder.encode(fan)


def decode_fan_out(payload: bytes | str) -> FanOut:
    """Raises msgspec.DecodeError on a malformed broadcast."""
    return _fan_decoder.decode(payload)
