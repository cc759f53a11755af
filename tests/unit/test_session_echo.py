"""Every error frame about a command echoes its id, also when the frame was refused unparsed."""

import json

from appliance.core.protocol import Role, command_id
from appliance.core.session import Limits, SendError, Session


def error_of(action) -> dict:
    assert isinstance(action, SendError)
    return json.loads(action.frame)


def test_message_too_large_echoes_the_id():
    session = Session("LLM", Role.CONTROLLER, Limits(64, 0, 1), now=0)
    frame = json.dumps({"target": "c", "message": "x" * 100, "id": "big-1"})
    error = error_of(session.receive_text(frame, now=0))
    assert (error["error"], error["id"], error["limit"]) == ("message_too_large", "big-1", 64)


def test_rate_limited_echoes_the_id():
    session = Session("LLM", Role.CONTROLLER, Limits(1000, rate=1, burst=1), now=0)
    session.receive_text('{"target": "c", "message": "m", "id": 1}', now=0)
    error = error_of(session.receive_text('{"target": "c", "message": "m", "id": 2}', now=0))
    assert (error["error"], error["id"]) == ("rate_limited", 2)


def test_an_unreadable_id_is_left_out():
    assert command_id('{"target": "c", "id": true}') is None
    assert command_id("not json") is None
    assert command_id('{"id": [1]}') is None
    assert command_id('{"message": "no id"}') is None
