"""The figures behind the hot-path tricks that were kept: each against its plain form.

``python -m bench.micro`` times every fast path of ``appliance/core/protocol*.py`` and
``appliance/wsbatch.py`` next to the plain code it replaces (the plain form that
tests/unit/test_fast_paths.py holds it to), fastest of many short batches so that a
busy machine disturbs it least, and prints each saving as a share of a round trip's
server CPU (``--v1-us`` / ``--v2-us``, from ``bench.ws_reply``). The rule (issue 19):
a trick that buys less than 1 % of a round trip goes back to the plain form.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

import msgspec
from websockets.protocol import State
from websockets.server import ServerProtocol

from appliance import wsbatch
from appliance.core import protocol, protocol_v2
from appliance.core.protocol_v2 import ClientReply, Status, TimeoutPolicy, is_valid_command_id

_plain_decoder = msgspec.json.Decoder()


def plain_client_reply(text: str) -> ClientReply | None:
    """:func:`protocol_v2.parse_client_reply` the plain way: any JSON, then each rule."""
    if not text.startswith("{"):
        return None
    try:
        data = _plain_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    if type(data) is not dict or data.keys() != {"reply_to", "message"}:
        return None
    reply_to, message = data["reply_to"], data["message"]
    if not is_valid_command_id(reply_to) or not isinstance(message, str):
        return None
    return ClientReply(reply_to, message)


def plain_frames(texts: list[str]) -> bytes:
    """:func:`wsbatch._frames` the plain way: ``_frame`` on each text."""
    return b"".join([wsbatch._frame(text.encode()) for text in texts])


_open_protocol = ServerProtocol()
_open_protocol.state = State.OPEN


def websockets_frames(texts: list[str]) -> bytes:
    """The frames as websockets' own ``send_text`` builds them (what uvicorn would write)."""
    for text in texts:
        _open_protocol.send_text(text.encode())
    return b"".join(_open_protocol.data_to_send())


def best_ns(call: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v1-us", type=float, default=20.0, help="server CPU of a v1 round trip (µs)")
    parser.add_argument("--v2-us", type=float, default=28.0, help="server CPU of a v2 round trip (µs)")
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    policy = TimeoutPolicy(30_000, 300_000)
    v1 = '{"target":"unity_client_1","message":"MoveForward 10"}'
    v2 = '{"target":"unity_client_1","message":"MoveForward 10","id":17}'
    reply = '{"reply_to":17,"message":"done"}'
    two = ['{"sender":"unity_client_1","message":"done"}', "MoveForward 10"]
    # (name, fast, plain, uses per round trip, round trip's server CPU in µs)
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], int, float]] = [
        (
            "v1 command: typed decode (parse_command) vs _explain",
            lambda: protocol.parse_command(v1),
            lambda: protocol._explain(v1),
            1,
            args.v1_us,
        ),
        (
            "v2 command: typed decode (parse_request) vs parse_request_plainly",
            lambda: protocol_v2.parse_request(v2, policy),
            lambda: protocol_v2.parse_request_plainly(v2, policy),
            1,
            args.v2_us,
        ),
        (
            "v2 reply: typed ClientReply vs a dict and checks",
            lambda: protocol_v2.parse_client_reply(reply),
            lambda: plain_client_reply(reply),
            1,
            args.v2_us,
        ),
        (
            "v2 delivered status: template vs encode_status",
            lambda: protocol_v2.encode_delivered(17, "unity_client_1"),
            lambda: protocol_v2.encode_status(17, Status.DELIVERED, "unity_client_1"),
            1,
            args.v2_us,
        ),
        (
            "frames: header table (_frames) vs _frame on each, per frame",
            lambda: wsbatch._frames(two[:1]),
            lambda: plain_frames(two[:1]),
            2,
            args.v1_us,
        ),
        (
            "frames: built here vs websockets' send_text, two frames",
            lambda: wsbatch._frames(two),
            lambda: websockets_frames(two),
            1,
            args.v1_us,
        ),
    ]
    print(f"{'trick':<66} {'fast ns':>8} {'plain ns':>9} {'share of a round trip':>22}")
    for name, fast, plain, uses, round_trip_us in cases:
        assert fast() == plain(), name
        fast_ns, plain_ns = best_ns(fast, args.number, args.repeat), best_ns(plain, args.number, args.repeat)
        share = 100 * uses * (plain_ns - fast_ns) / (round_trip_us * 1000)
        print(f"{name:<66} {fast_ns:>8.0f} {plain_ns:>9.0f} {share:>21.1f}%")


if __name__ == "__main__":
    main()
