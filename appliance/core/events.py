"""Messages between instances on the broker's per-instance channel and the fan-out channel. No I/O.

An :class:`Event` carries a command's outcome back to the instance its sender waits on,
or an order for the instance that holds a client; a :class:`FanOut` carries a broadcast or
group command to every instance. The broker moves their bytes and never looks inside.
"""

from __future__ import annotations

import msgspec

from .protocol_v2 import CommandId

__all__ = ["Event", "FanOut", "decode_event", "decode_fan_out", "encode_event", "encode_fan_out"]


class Event(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """An outcome travelling back to the sender's instance, or an order for another instance.

    ``kind``: ``d`` delivered, ``r`` reply (``sender``, ``message``), ``e`` error
    (``code``, ``detail``), ``n`` fan-out count (``count``), ``x`` close a local
    connection (``target``, ``code``), ``q`` hand over what is queued for ``target``,
    ``c`` send ``target``'s recent commands (at most ``count``) to instance ``sender``,
    ``C`` those commands (``message``, JSON) for the question ``owner``.
    """

    kind: str
    owner: str = ""
    id: CommandId | None = None
    target: str = ""
    sender: str = ""
    message: str = ""
    code: str = ""
    detail: str = ""
    count: int = 0


class FanOut(msgspec.Struct, frozen=True):
    """A broadcast or group command, sent to every instance; each counts its local receivers."""

    origin: str
    owner: str
    id: CommandId | None
    controller: str
    message: str
    group: str | None


_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_fan_encoder = msgspec.json.Encoder()
_fan_decoder = msgspec.json.Decoder(FanOut)


def encode_event(event: Event) -> bytes:
    return _event_encoder.encode(event)


def decode_event(payload: bytes | str) -> Event:
    """Raises msgspec.DecodeError on a malformed event."""
    return _event_decoder.decode(payload)


def encode_fan_out(fan: FanOut) -> bytes:
    return _fan_encoder.encode(fan)


def decode_fan_out(payload: bytes | str) -> FanOut:
    """Raises msgspec.DecodeError on a malformed broadcast."""
    return _fan_decoder.decode(payload)
