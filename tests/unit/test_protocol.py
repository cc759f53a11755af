"""The wire formats, byte for byte: these are the seed's compatibility contract."""

import json

import pytest

from appliance.core.protocol import (
    CLOSE_REASONS,
    CloseCode,
    Command,
    ErrorCode,
    ProtocolError,
    encode_error,
    encode_reply,
    is_valid_client_id,
    parse_command,
)


def test_reply_frame_is_compact_json_with_sender_first():
    assert encode_reply("unity_client_1", "Movement completed") == (
        '{"sender":"unity_client_1","message":"Movement completed"}'
    )


def test_reply_frame_keeps_unicode_and_escapes_quotes():
    frame = encode_reply("c1", 'héllo "wörld"\n')
    assert frame == '{"sender":"c1","message":"héllo \\"wörld\\"\\n"}'
    assert json.loads(frame) == {"sender": "c1", "message": 'héllo "wörld"\n'}


def test_seed_command_parses():
    assert parse_command('{"target": "unity_client_1", "message": "MoveForward 10"}') == Command(
        "unity_client_1", "MoveForward 10"
    )


def test_command_id_is_kept_for_error_frames():
    assert parse_command('{"target": "a", "message": "m", "id": 42}') == Command("a", "m", 42)
    assert parse_command('{"target": "a", "message": "m", "id": "x-1"}') == Command("a", "m", "x-1")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", ErrorCode.INVALID_JSON),
        ('{"target": "a", "message": ', ErrorCode.INVALID_JSON),
        ('["a", "b"]', ErrorCode.INVALID_MESSAGE),
        ('"just a string"', ErrorCode.INVALID_MESSAGE),
        ('{"message": "m"}', ErrorCode.INVALID_MESSAGE),
        ('{"target": "a"}', ErrorCode.INVALID_MESSAGE),
        ('{"target": 5, "message": "m"}', ErrorCode.INVALID_MESSAGE),
        ('{"target": "a", "message": {"x": 1}}', ErrorCode.INVALID_MESSAGE),
        ('{"target": "a", "message": "m", "id": true}', ErrorCode.INVALID_MESSAGE),
        ('{"target": "a", "message": "m", "id": [1]}', ErrorCode.INVALID_MESSAGE),
        ('{"target": "bad id!", "message": "m"}', ErrorCode.INVALID_TARGET),
        ('{"target": "", "message": "m"}', ErrorCode.INVALID_TARGET),
        ('{"target": "' + "x" * 51 + '", "message": "m"}', ErrorCode.INVALID_TARGET),
    ],
)
def test_bad_frames_get_the_documented_error_code(frame, code):
    result = parse_command(frame)
    assert isinstance(result, ProtocolError)
    assert result.code is code
    decoded = json.loads(result.encode())
    assert decoded["error"] == code.value
    assert decoded["detail"]


def test_error_frame_names_target_and_echoes_id():
    result = parse_command('{"target": "no way", "message": "m", "id": 7}')
    assert json.loads(result.encode()) == {
        "error": "invalid_target",
        "detail": "target must match ^[a-zA-Z0-9_-]{1,50}$",
        "target": "no way",
        "id": 7,
    }


def test_error_frame_starts_with_error_code():
    assert encode_error(ErrorCode.TARGET_OFFLINE, "gone", target="a").startswith('{"error":"target_offline",')


@pytest.mark.parametrize("client_id", ["a", "LLM", "unity_client_1", "A-b_9", "x" * 50])
def test_valid_ids(client_id):
    assert is_valid_client_id(client_id)


@pytest.mark.parametrize("client_id", ["", "x" * 51, "a b", "a.b", "a/b", "é", "a\n"])
def test_invalid_ids(client_id):
    assert not is_valid_client_id(client_id)


def test_every_close_code_has_a_reason_without_secrets():
    assert set(CLOSE_REASONS) == set(CloseCode)
    for reason in CLOSE_REASONS.values():
        assert 0 < len(reason.encode()) <= 123  # RFC 6455 §5.5: control frame payload <= 125 bytes.
