"""The sans-I/O session: feed an event, assert the action. No sockets, no event loop."""

import json

import pytest

from appliance.core.protocol import CloseCode, Command, ErrorCode, Role
from appliance.core.protocol_v2 import TargetKind, TimeoutPolicy
from appliance.core.session import (
    Close,
    Deliver,
    InvalidState,
    Limits,
    Publish,
    ReplyOrPublish,
    SendError,
    Session,
    State,
    Submit,
    Throttle,
    authorize,
)

UNLIMITED = Limits(max_message_bytes=64, rate=0, burst=1)


def error_of(action):
    assert isinstance(action, SendError), action
    return json.loads(action.frame)


@pytest.mark.parametrize(
    ("client_id", "role", "id_pattern", "expected"),
    [
        ("LLM", "controller", None, Role.CONTROLLER),
        ("planner-2", "controller", None, Role.CONTROLLER),
        ("unity_client_1", "client", None, Role.CLIENT),
        ("LLM", "client", None, CloseCode.RESERVED_ID),
        ("unity_client_1", None, None, CloseCode.UNAUTHORIZED),
        ("unity_client_1", "admin", None, CloseCode.UNAUTHORIZED),
        ("unity_client_1", "viewer", None, CloseCode.UNAUTHORIZED),
        ("bad id", "client", None, CloseCode.INVALID_CLIENT_ID),
        ("x" * 51, "controller", None, CloseCode.INVALID_CLIENT_ID),
        ("lights_kitchen", "client", "lights_*", Role.CLIENT),
        ("door_1", "client", "lights_*", CloseCode.UNAUTHORIZED),
        ("Lights_1", "client", "lights_*", CloseCode.UNAUTHORIZED),  # case-sensitive, like ids
        ("LLM", "client", "*", CloseCode.RESERVED_ID),
    ],
)
def test_authorize(client_id, role, id_pattern, expected):
    assert authorize(client_id, role, id_pattern) == expected


def test_controller_command_becomes_deliver():
    session = Session("LLM", Role.CONTROLLER, UNLIMITED, now=0)
    action = session.receive_text('{"target": "c1", "message": "MoveForward 10"}', now=1)
    assert isinstance(action, Deliver)
    assert (action.command.target, action.command.message) == ("c1", "MoveForward 10")
    assert session.messages_in == 1 and session.last_activity == 1


def test_controller_bad_json_gets_error_frame():
    session = Session("LLM", Role.CONTROLLER, UNLIMITED, now=0)
    assert error_of(session.receive_text("{nope", now=0))["error"] == "invalid_json"


def test_controller_oversized_frame_gets_error_with_limit():
    session = Session("LLM", Role.CONTROLLER, UNLIMITED, now=0)
    ok = '{"target":"c","message":"' + "x" * (64 - 27) + '"}'
    assert len(ok.encode()) == 64
    assert isinstance(session.receive_text(ok, now=0), Deliver)
    error = error_of(session.receive_text(ok[:-2] + 'x"}', now=0))
    assert error["error"] == "message_too_large" and error["limit"] == 64


def test_size_limit_counts_utf8_bytes_not_characters():
    session = Session("LLM", Role.CONTROLLER, UNLIMITED, now=0)
    text = '{"target":"c","message":"' + "é" * 20 + '"}'  # 47 characters, 67 bytes
    assert len(text) < 64 < len(text.encode())
    assert error_of(session.receive_text(text, now=0))["error"] == "message_too_large"


def test_controller_rate_limit_answers_rate_limited_with_retry_after():
    session = Session("LLM", Role.CONTROLLER, Limits(1000, rate=2, burst=2), now=0)
    frame = '{"target": "c1", "message": "m"}'
    assert isinstance(session.receive_text(frame, now=0), Deliver)
    assert isinstance(session.receive_text(frame, now=0), Deliver)
    error = error_of(session.receive_text(frame, now=0))
    assert error == {"error": "rate_limited", "detail": "too many messages; retry later", "retry_after_ms": 500}
    assert isinstance(session.receive_text(frame, now=0.5), Deliver)


def test_client_text_becomes_reply_frame_for_controllers():
    session = Session("unity_client_1", Role.CLIENT, UNLIMITED, now=0)
    assert session.receive_text("Movement completed", now=0) == Publish(
        '{"sender":"unity_client_1","message":"Movement completed"}'
    )


def test_client_over_rate_is_throttled_not_dropped():
    session = Session("c1", Role.CLIENT, Limits(1000, rate=10, burst=1), now=0)
    assert isinstance(session.receive_text("a", now=0), Publish)
    action = session.receive_text("b", now=0)
    assert isinstance(action, Throttle)
    assert action.seconds == pytest.approx(0.1)
    assert action.then == Publish('{"sender":"c1","message":"b"}')


def test_client_oversized_message_closes_with_1009():
    session = Session("c1", Role.CLIENT, UNLIMITED, now=0)
    assert session.receive_text("x" * 65, now=0) == Close(CloseCode.MESSAGE_TOO_BIG, "message exceeds 64 bytes")


def test_undecodable_binary_frame():
    controller = Session("LLM", Role.CONTROLLER, UNLIMITED, now=0)
    assert error_of(controller.receive_undecodable())["error"] == ErrorCode.UNSUPPORTED_FRAME.value
    client = Session("c1", Role.CLIENT, UNLIMITED, now=0)
    assert client.receive_undecodable().code is CloseCode.UNSUPPORTED_DATA


def test_delivery_failure_names_target_and_id():
    session = Session("LLM", Role.CONTROLLER, UNLIMITED, now=0)
    deliver = session.receive_text('{"target": "c9", "message": "m", "id": "a1"}', now=0)
    failure = session.delivery_failed(deliver.command, ErrorCode.TARGET_OFFLINE, "c9 is not connected")
    assert json.loads(failure.frame) == {
        "error": "target_offline",
        "detail": "c9 is not connected",
        "target": "c9",
        "id": "a1",
    }


def test_events_after_close_raise():
    session = Session("c1", Role.CLIENT, UNLIMITED, now=0)
    session.closing()
    assert session.state is State.CLOSING
    with pytest.raises(InvalidState):
        session.receive_text("late", now=0)
    session.closed()
    with pytest.raises(InvalidState):
        session.closing()


# --- protocol version 2: commands with an id ------------------------------------------------------


V2_LIMITS = Limits(max_message_bytes=65536, rate=0, burst=1, timeouts=TimeoutPolicy(1000, 5000))


def test_command_with_id_becomes_a_submit_with_its_timeout():
    session = Session("LLM", Role.CONTROLLER, V2_LIMITS, now=0.0)
    action = session.receive_text('{"target": "u1", "message": "m", "id": "a", "timeout_ms": 2500}', 0.0)
    assert isinstance(action, Submit)
    assert (action.request.id, action.request.timeout_ms, action.request.kind) == ("a", 2500, TargetKind.CLIENT)


def test_command_without_id_stays_on_the_version_1_path():
    session = Session("LLM", Role.CONTROLLER, V2_LIMITS, now=0.0)
    action = session.receive_text('{"target": "u1", "message": "m", "timeout_ms": 999999}', 0.0)
    assert isinstance(action, Deliver)  # unknown fields are ignored, as in version 1


def test_broadcast_and_group_targets_are_submitted_and_bad_ones_keep_the_v1_error():
    session = Session("LLM", Role.CONTROLLER, V2_LIMITS, now=0.0)
    assert isinstance(session.receive_text('{"target": "*", "message": "m"}', 0.0), Submit)
    assert session.receive_text('{"target": "group:red", "message": "m"}', 0.0).request.group == "red"
    error = session.receive_text('{"target": "not valid!", "message": "m"}', 0.0)
    assert error.code is ErrorCode.INVALID_TARGET
    assert "group" not in error.frame  # the version-1 detail, byte for byte


def test_bad_v2_field_is_an_error_frame_naming_the_id():
    session = Session("LLM", Role.CONTROLLER, V2_LIMITS, now=0.0)
    error = session.receive_text('{"target": "u1", "message": "m", "id": 3, "timeout_ms": 5001}', 0.0)
    assert error.code is ErrorCode.INVALID_MESSAGE and '"id":3' in error.frame


def test_without_a_timeout_policy_every_command_is_version_1():
    session = Session("LLM", Role.CONTROLLER, Limits(65536, 0, 1), now=0.0)
    assert isinstance(session.receive_text('{"target": "u1", "message": "m", "id": 1}', 0.0), Deliver)


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        # '"id"' appears, but not as a field: version 1, with or without valid v2 extras.
        ('{"target":"u1","message":"m","note":"id"}', Deliver(Command("u1", "m"))),
        ('{"target":"u1","message":"m","note":"id","timeout_ms":999999}', Deliver(Command("u1", "m"))),
        ('{"target":"u1","message":"m","note":"id","queue":true}', Deliver(Command("u1", "m"))),
        # An id key spelt with an escape still makes a version-2 command.
        ('{"target":"u1","message":"m","\\u0069d":7}', "submit 7"),
        # A bad target keeps the version-1 error, naming the id.
        (
            '{"target":"bad!","message":"m","id":1}',
            '{"error":"invalid_target","detail":"target must match ^[a-zA-Z0-9_-]{1,50}$","target":"bad!","id":1}',
        ),
    ],
)
def test_one_decode_path_for_frames_with_id_gives_what_the_two_step_path_gave(frame, expected):
    session = Session("LLM", Role.CONTROLLER, V2_LIMITS, now=0.0)
    action = session.receive_text(frame, 0.0)
    if expected == "submit 7":
        assert isinstance(action, Submit) and action.request.id == 7
    elif isinstance(expected, str):
        assert action.frame == expected
    else:
        assert action == expected


def test_version_2_client_text_builds_its_reply_frame_only_when_published():
    session = Session("u2", Role.CLIENT, UNLIMITED, now=0, v2=True)
    action = session.receive_text('{"reply_to":1,"message":"ok"}', now=0)
    assert action == ReplyOrPublish("u2", '{"reply_to":1,"message":"ok"}')
    # Published (no command waits for it: a broadcast's, or late): the client's plain message, not the envelope.
    assert action.frame == '{"sender":"u2","message":"ok"}'
    # Other JSON of the client's own is its message as it is.
    other = session.receive_text('{"reply_to":1}', now=0)
    assert other.frame == '{"sender":"u2","message":"{\\"reply_to\\":1}"}'
