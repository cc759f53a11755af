"""Every hot-path trick that was kept gives the same answer as the plain form it replaces.

The fast paths (a typed msgspec decode, a string template, frames built by hand) and
their measured gains are listed in ``bench/micro.py``; here Hypothesis feeds both forms
arbitrary input and asks for the same result: the same Command or Request, or the same
error frame; the same bytes. A trick that drifted from its plain form fails here.
"""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st
from websockets.protocol import State
from websockets.server import ServerProtocol

from appliance.core.protocol import _explain, parse_command
from appliance.core.protocol_v2 import (
    Status,
    TimeoutPolicy,
    encode_delivered,
    encode_status,
    parse_client_reply,
    parse_request,
    parse_request_plainly,
)
from appliance.wsbatch import _frame, _frames
from bench.micro import plain_client_reply

POLICY = TimeoutPolicy(default_ms=30_000, max_ms=300_000)

ids = st.from_regex(r"\A[a-zA-Z0-9_-]{1,50}\Z")
targets = (
    ids | st.sampled_from(["*", "group:red", "group:", "group:a b", "", "x" * 51, "LLM", "a\n"]) | st.text(max_size=8)
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**53 - 1, 2**53, -(2**53) + 1, -(2**53), 2**63, 2**64, 10**30])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=70)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
)
#: Objects shaped like v1 and v2 commands: the known keys with right, wrong and edge values, plus noise.
commands = st.fixed_dictionaries(
    {},
    optional={
        "target": targets | values,
        "message": st.text(max_size=20) | values,
        "id": ids | st.integers(-(2**60), 2**60) | st.text(max_size=70) | values,
        "timeout_ms": st.integers(-5, 400_000) | values,
        "queue": st.booleans() | values,
    },
).flatmap(lambda d: st.dictionaries(st.text(max_size=6), values, max_size=2).map(lambda extra: {**extra, **d}))


def frames_of(draw_json: dict) -> str:
    return json.dumps(draw_json)


texts = st.text(max_size=40) | commands.map(frames_of) | values.map(json.dumps)


@given(texts)
@example('{"target":"a","target":"b","message":"m"}')  # duplicate keys: the last one wins in both
@example('{"target":"unity_client_1","message":"m","id":true}')
@example('{"target":"u","message":"m","id":1.0}')
@example("[" * 2000)
def test_the_v1_typed_decode_answers_as_the_plain_path(text: str) -> None:
    assert parse_command(text) == _explain(text)


@given(texts)
@example('{"target":"u","message":"m","id":9007199254740992}')  # 2**53: not an id
@example('{"target":"u","message":"m","id":"","queue":true}')
@example('{"target":"*","message":"m","id":1,"queue":true}')
@example('{"target":"u","message":"m","id":1,"timeout_ms":0}')
@example('{"target":"u","message":"m","id":1,"timeout_ms":true}')
@example('{"id":' + "[" * 2000 + "]" * 2000 + "}")
@example("[" * 2000)
def test_the_v2_typed_decode_answers_as_the_plain_path(text: str) -> None:
    assert parse_request(text, POLICY) == parse_request_plainly(text, POLICY)


def test_a_v2_frame_nested_too_deeply_is_an_error_frame_not_a_crash() -> None:
    """Found by the comparison above: the plain path let RecursionError out (the connection died)."""
    answer = parse_request('{"id":' + "[" * 5000 + "}", POLICY)
    assert answer.code.value == "invalid_json" and "nested" in answer.detail


replies = st.fixed_dictionaries(
    {},
    optional={
        "reply_to": st.integers(-(2**60), 2**60) | st.text(max_size=70) | values,
        "message": st.text(max_size=10) | values,
    },
).flatmap(lambda d: st.dictionaries(st.text(max_size=6), values, max_size=1).map(lambda extra: {**extra, **d}))


@given(st.text(max_size=40) | replies.map(json.dumps) | values.map(json.dumps))
@example('{"reply_to":true,"message":"m"}')
@example('{"reply_to":"","message":"m"}')
@example('{"reply_to":1,"message":"m","reply_to":2}')
@example('{"reply_to":' + "[" * 2000 + "}")
def test_the_typed_client_reply_answers_as_the_plain_checks(text: str) -> None:
    assert parse_client_reply(text) == plain_client_reply(text)


@given(st.integers(-(2**53) + 1, 2**53 - 1) | st.text(min_size=1, max_size=64), ids)
def test_the_delivered_template_is_the_status_encoders_bytes(command_id: int | str, client_id: str) -> None:
    assert encode_delivered(command_id, client_id) == encode_status(command_id, Status.DELIVERED, client_id)


@given(st.lists(st.text(max_size=70) | st.integers(0, 70_000).map(lambda n: "x" * n), max_size=6))
def test_frames_built_by_hand_are_the_bytes_websockets_writes(texts: list[str]) -> None:
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    for text in texts:
        protocol.send_text(text.encode())
    expected = b"".join(protocol.data_to_send())
    assert _frames(texts) == expected
    assert b"".join(_frame(text.encode()) for text in texts) == expected
