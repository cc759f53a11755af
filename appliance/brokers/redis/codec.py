"""The bytes on the broker's channels and in its keys: one place that writes and reads them.

Channel payloads (the first byte says the kind):

- ``m{seq}|{origin}|{sender}\\n<text>``: a command without id for a client (``sender``: the
  controller, which a version-2 client is told);
- ``r{seq}|{origin}\\n<json>``: a command with an id (:class:`~appliance.core.requests.Routed`);
- ``k<owner>``: close the connection ``owner``, which a newer claim replaced;
- ``a{seq},{seq}:{error_code},...``: outcomes for the instance that published those commands;
- ``e<payload>``: a command-service event for one instance (status, reply, count, order).
"""

from __future__ import annotations

import logging

import msgspec

from ...core.protocol import ErrorCode
from ...core.requests import Enqueued, Routed
from ..base import Owner

__all__ = [
    "ENQUEUED",
    "QueuedEntry",
    "decode_owner",
    "encode_answer",
    "encode_answers",
    "encode_json",
    "decode_json",
    "decode_queued",
    "decode_routed",
    "parse_answers",
]

log = logging.getLogger(__name__)

encode_json = msgspec.json.Encoder().encode
decode_json = msgspec.json.Decoder().decode
_CODES = {code.value: code for code in ErrorCode}


class QueuedEntry(msgspec.Struct, frozen=True):
    """A command waiting in an absent client's offline queue."""

    routed: Routed
    expires: float  # epoch seconds on the enqueuing instance's clock


decode_routed = msgspec.json.Decoder(Routed).decode
decode_queued = msgspec.json.Decoder(QueuedEntry).decode

#: The ENQUEUE script's answers.
ENQUEUED = {
    "ok": Enqueued.QUEUED,
    "q": Enqueued.ALREADY_QUEUED,
    "d": Enqueued.ALREADY_DELIVERED,
    "full": Enqueued.FULL,
}


def decode_owner(value: bytes) -> Owner | None:
    """Another holder's owner value; None if unreadable (a release with another format, say)."""
    try:
        return Owner.decode(value.decode())
    except ValueError:
        log.warning("Unreadable owner value in Redis: %r", value[:120])
        return None


def encode_answer(seq: bytes, failure: ErrorCode | None) -> bytes:
    """One outcome of an ``a`` batch: ``seq`` delivered, or ``seq:code`` not delivered."""
    return seq if failure is None else seq + b":" + failure.value.encode()


def encode_answers(batch: list[bytes]) -> bytes:
    return b"a" + b",".join(batch)


def parse_answers(payload: bytes) -> list[tuple[int, ErrorCode | None]]:
    """An ``a`` batch without its kind byte: (seq, None if delivered else the error code)."""
    answers = []
    for answer in payload.split(b","):
        seq, _, code = answer.partition(b":")
        answers.append((int(seq), _CODES.get(code.decode(), ErrorCode.DELIVERY_FAILED) if code else None))
    return answers
