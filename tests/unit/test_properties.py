"""Property-based tests of the pure core (Hypothesis): any input has a documented outcome.

The parser, one connection's session and the token buckets are fed arbitrary text,
arbitrary JSON and arbitrary event sequences (clocks that jump or go backwards too).
The profile in ``tests/conftest.py`` is derandomized, so CI sees the same examples
every run and never flakes; ``HYPOTHESIS_PROFILE=thorough`` explores further.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import msgspec
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from appliance.core.protocol import (
    CLOSE_REASONS,
    CONNECTION_ROLES,
    CloseCode,
    Command,
    ErrorCode,
    ProtocolError,
    Role,
    command_id,
    is_valid_client_id,
    parse_command,
)
from appliance.core.ratelimit import TokenBucket
from appliance.core.session import Close, Deliver, InvalidState, Limits, Publish, SendError, Session, State, Throttle

PROTOCOL_DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
DOCUMENTED_ERRORS = set(re.findall(r"^\| `([a-z_]+)` \|", PROTOCOL_DOC, re.MULTILINE))
DOCUMENTED_CLOSE_CODES = {int(code) for code in re.findall(r"^\| (\d{4}) \|", PROTOCOL_DOC, re.MULTILINE)}

ids = st.from_regex(r"\A[a-zA-Z0-9_-]{1,50}\Z")
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
#: Objects that look like commands: the right keys with any values, plus noise.
command_like = st.fixed_dictionaries(
    {},
    optional={"target": json_values | ids, "message": json_values | st.text(), "id": json_values},
).flatmap(lambda d: st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(lambda extra: {**extra, **d}))


def mutate(text: str, data: st.DataObject) -> str:
    """Cut, duplicate or corrupt a valid frame at a random place."""
    if not text:
        return text
    i = data.draw(st.integers(0, len(text) - 1))
    how = data.draw(st.sampled_from(["cut", "drop", "dup", "insert"]))
    if how == "cut":
        return text[:i]
    if how == "drop":
        return text[:i] + text[i + 1 :]
    if how == "dup":
        return text[:i] + text[i:] * 2
    return text[:i] + data.draw(st.sampled_from(['"', "{", "}", ",", ":", "\\", "\x00", "\ud7ff", "1e999"])) + text[i:]


def test_every_error_and_close_code_is_documented():
    assert {code.value for code in ErrorCode} <= DOCUMENTED_ERRORS
    assert {int(code) for code in CloseCode if code >= 4000} <= DOCUMENTED_CLOSE_CODES
    assert set(CLOSE_REASONS) == set(CloseCode)


def check_parsed(parsed: object) -> None:
    """A documented outcome: a deliverable command, or an error with a documented code and JSON frame."""
    if isinstance(parsed, Command):
        assert is_valid_client_id(parsed.target)
        assert isinstance(parsed.message, str)
        assert parsed.id is None or (isinstance(parsed.id, (str, int)) and not isinstance(parsed.id, bool))
        return
    assert isinstance(parsed, ProtocolError), parsed
    assert parsed.code.value in DOCUMENTED_ERRORS
    frame = json.loads(parsed.encode())
    assert frame["error"] == parsed.code.value and isinstance(frame["detail"], str)


@given(st.text())
def test_any_text_parses_to_a_command_or_a_documented_error(text):
    check_parsed(parse_command(text))


@given(command_like)
def test_any_json_object_parses_to_a_command_or_a_documented_error(obj):
    text = json.dumps(obj)
    parsed = parse_command(text)
    check_parsed(parsed)
    valid = (
        isinstance(obj.get("target"), str)
        and is_valid_client_id(obj["target"])
        and isinstance(obj.get("message"), str)
        and (obj.get("id") is None or (isinstance(obj.get("id"), (str, int)) and not isinstance(obj["id"], bool)))
    )
    if valid and not (isinstance(obj.get("id"), int) and abs(obj["id"]) >= 2**63):
        assert parsed == Command(obj["target"], obj["message"], obj.get("id"))
    elif not valid:
        assert isinstance(parsed, ProtocolError)


@given(json_values)
def test_any_json_value_parses_to_a_command_or_a_documented_error(value):
    check_parsed(parse_command(json.dumps(value)))


@given(ids, st.text(), st.data())
def test_mutated_commands_parse_to_a_command_or_a_documented_error(target, message, data):
    check_parsed(parse_command(mutate(json.dumps({"target": target, "message": message}), data)))


@given(st.integers(min_value=1, max_value=200), st.sampled_from(["[", '{"a":']))
def test_deeply_nested_json_is_an_error_not_a_crash(depth, opener):
    text = opener * depth + "1" + ("]" if opener == "[" else "}") * depth
    check_parsed(parse_command(text))
    check_parsed(parse_command(opener * depth))


def test_nesting_far_beyond_the_decoder_limit_is_an_error_not_a_crash():
    deep = "[" * 5_000 + "]" * 5_000
    for text in (
        "[" * 100_000,
        deep,
        '{"target":' * 50_000,
        f'{{"target":"c1","message":"m","extra":{deep}}}',
        f'{{"target":"c1","message":"m","id":{deep}}}',
    ):
        parsed = parse_command(text)
        assert isinstance(parsed, ProtocolError) and parsed.code.value in DOCUMENTED_ERRORS, parsed
        assert command_id(text) is None


@given(st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400, 1e308, -0.0]))
def test_numbers_at_the_limits_are_documented_outcomes(number):
    check_parsed(parse_command(f'{{"target":"c1","message":"m","id":{number}}}'))
    check_parsed(parse_command(f'{{"target":{number},"message":"m"}}'))


# --- Session: any sequence of events -------------------------------------------------------------

CONTROLLER_OUTCOMES = (Deliver, SendError)
CLIENT_OUTCOMES = (Publish, Throttle, Close)
LIMIT = 64


class SessionMachine(RuleBasedStateMachine):
    """Drives one session through any sequence of events, checking every outcome and invariant."""

    @initialize(
        role=st.sampled_from(CONNECTION_ROLES), rate=st.sampled_from([0, 0.5, 10, 1000]), burst=st.integers(1, 5)
    )
    def start(self, role, rate, burst):
        self.session = Session("c1", role, Limits(max_message_bytes=LIMIT, rate=rate, burst=burst), now=1000.0)
        self.now = 1000.0
        self.received = 0
        self.sent = 0

    @rule(step=st.floats(min_value=-5, max_value=50, allow_nan=False))
    def tick(self, step):
        self.now += step  # Wall clocks can go backwards: nothing may break.

    @rule(text=st.text(max_size=80) | command_like.map(json.dumps))
    def receive_text(self, text):
        before = self.session.state
        try:
            action = self.session.receive_text(text, self.now)
        except InvalidState:
            assert before is not State.OPEN
            return
        assert before is State.OPEN
        self.received += 1
        assert self.session.last_activity == self.now
        self.check_action(action, text)

    @rule()
    def receive_undecodable(self):
        before = self.session.state
        try:
            action = self.session.receive_undecodable()
        except InvalidState:
            assert before is not State.OPEN
            return
        if self.session.role is Role.CONTROLLER:
            assert isinstance(action, SendError) and action.code is ErrorCode.UNSUPPORTED_FRAME
        else:
            assert action == Close(CloseCode.UNSUPPORTED_DATA, "binary frames must be UTF-8 text")

    @rule()
    def sent_frame(self):
        self.session.sent(self.now)
        self.sent += 1

    @rule(to=ids, code=st.sampled_from([ErrorCode.TARGET_OFFLINE, ErrorCode.DELIVERY_FAILED]))
    def delivery_failed(self, to, code):
        action = self.session.delivery_failed(Command(to, "m", 7), code, "detail")
        frame = json.loads(action.frame)
        assert (frame["error"], frame["target"], frame["id"]) == (code.value, to, 7)

    @precondition(lambda self: self.session.state is not State.CLOSED)
    @rule()
    def closing(self):
        self.session.closing()
        assert self.session.state is State.CLOSING

    @precondition(lambda self: self.session.state is State.CLOSED)
    @rule()
    def closing_after_closed_is_invalid(self):
        try:
            self.session.closing()
        except InvalidState:
            return
        raise AssertionError("closing() after closed() must raise InvalidState")

    @rule()
    def closed(self):
        self.session.closed()
        assert self.session.state is State.CLOSED

    def check_action(self, action, text):
        if self.session.role is Role.CONTROLLER:
            assert isinstance(action, CONTROLLER_OUTCOMES), action
            if isinstance(action, SendError):
                frame = json.loads(action.frame)
                assert frame["error"] == action.code.value and action.code.value in DOCUMENTED_ERRORS
                if action.code is ErrorCode.RATE_LIMITED:
                    assert frame["retry_after_ms"] >= 1
            else:
                assert is_valid_client_id(action.command.target)
                assert len(text.encode()) <= LIMIT
            return
        assert isinstance(action, CLIENT_OUTCOMES), action
        if isinstance(action, Close):
            assert action.code is CloseCode.MESSAGE_TOO_BIG and len(text.encode()) > LIMIT
            return
        if isinstance(action, Throttle):
            assert 0 < action.seconds < math.inf
            action = action.then
        assert len(text.encode()) <= LIMIT
        # The seed's reply frame, whatever the text: the controller reads back exactly what was sent.
        assert msgspec.json.decode(action.frame) == {"sender": "c1", "message": text}

    @invariant()
    def counters_match_events(self):
        assert self.session.messages_in == self.received
        assert self.session.messages_out == self.sent


TestSessionMachine = SessionMachine.TestCase
# Sequences of up to 40 events; more examples than steps find more (measured: 3 s on a shared core).
TestSessionMachine.settings = settings(max_examples=80, stateful_step_count=40)


# --- Token buckets --------------------------------------------------------------------------------


@given(
    rate=st.floats(min_value=0.01, max_value=1e4),
    burst=st.integers(1, 100),
    steps=st.lists(st.floats(min_value=-1, max_value=10, allow_nan=False), max_size=60),
)
def test_try_take_never_allows_more_than_burst_plus_rate_times_time(rate, burst, steps):
    bucket, now, start, taken = TokenBucket(rate, burst, 0.0), 0.0, 0.0, 0
    latest = 0.0
    for step in steps:
        now += step
        latest = max(latest, now)
        wait = bucket.try_take(now)
        assert wait >= 0 and math.isfinite(wait)
        if wait == 0:
            taken += 1
        else:
            assert wait <= 1 / rate + 1e-9  # Never more than one token's time away.
        assert bucket._tokens <= bucket.burst  # The invariant itself.
    assert taken <= burst + rate * (latest - start) + 1e-6


@given(rate=st.floats(min_value=0.01, max_value=1e4), burst=st.integers(1, 100), n=st.integers(1, 300))
def test_waiting_the_returned_time_always_gets_a_token(rate, burst, n):
    bucket, now = TokenBucket(rate, burst, 0.0), 0.0
    for _ in range(n):
        wait = bucket.try_take(now)
        if wait:
            now += wait * (1 + 1e-9) + 1e-12
            assert bucket.try_take(now) == 0.0


@given(
    rate=st.floats(min_value=0.01, max_value=1e4),
    burst=st.integers(1, 100),
    steps=st.lists(st.floats(min_value=0, max_value=2, allow_nan=False), min_size=1, max_size=60),
)
def test_reserve_paces_a_client_at_the_rate_and_loses_nothing(rate, burst, steps):
    """Every reserved message is acted on; the wait makes the pace ``rate`` beyond the burst."""
    bucket, now, acted_at = TokenBucket(rate, burst, 0.0), 0.0, []
    for step in steps:
        now += step
        wait = bucket.reserve(now)
        assert wait >= 0 and math.isfinite(wait)
        now += wait  # The reader sleeps, then acts: the next frame is read after that.
        acted_at.append(now)
    assert len(acted_at) == len(steps)
    assume(acted_at[-1] > 0)
    assert len(acted_at) <= burst + rate * acted_at[-1] + 1e-6


@given(burst=st.integers(1, 100), steps=st.lists(st.floats(-10, 10, allow_nan=False), max_size=30))
def test_rate_zero_is_unlimited(burst, steps):
    bucket, now = TokenBucket(0, burst, 0.0), 0.0
    for step in steps:
        now += step
        assert bucket.try_take(now) == 0.0 and bucket.reserve(now) == 0.0
