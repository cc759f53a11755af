"""Version-2 frames: parsing of the new command fields and the exact bytes of each new frame."""

import json

import pytest

from appliance.core.protocol import ErrorCode, ProtocolError
from appliance.core.protocol_v2 import (
    MAX_GROUPS,
    ClientReply,
    Request,
    Status,
    TargetKind,
    TimeoutPolicy,
    encode_client_command,
    encode_controller_reply,
    encode_delivered,
    encode_status,
    is_valid_command_id,
    parse_client_reply,
    parse_groups,
    parse_request,
    request_from_fields,
    target_kind,
)

POLICY = TimeoutPolicy(default_ms=30_000, max_ms=300_000)


def test_seed_command_reads_as_a_request_without_id_and_default_timeout():
    assert parse_request('{"target": "unity_client_1", "message": "MoveForward 10"}', POLICY) == Request(
        "unity_client_1", "MoveForward 10", None, 30_000, False, TargetKind.CLIENT
    )


def test_all_v2_fields_are_read():
    request = parse_request('{"target":"u1","message":"m","id":"a-1","timeout_ms":1500,"queue":true}', POLICY)
    assert request == Request("u1", "m", "a-1", 1500, True, TargetKind.CLIENT)


@pytest.mark.parametrize(
    ("target", "kind", "group"),
    [
        ("u1", TargetKind.CLIENT, None),
        ("*", TargetKind.BROADCAST, None),
        ("group:red-team", TargetKind.GROUP, "red-team"),
    ],
)
def test_targets_name_a_client_everybody_or_a_group(target, kind, group):
    request = parse_request(json.dumps({"target": target, "message": "m", "id": 1}), POLICY)
    assert isinstance(request, Request)
    assert request.kind is kind
    assert request.group == group


@pytest.mark.parametrize("target", ["group:", "group:bad name", "**", "group:a:b", "Group:x", "x" * 51, ""])
def test_malformed_targets_are_invalid_target_with_the_id_echoed(target):
    error = parse_request(json.dumps({"target": target, "message": "m", "id": 7}), POLICY)
    assert isinstance(error, ProtocolError)
    assert error.code is ErrorCode.INVALID_TARGET
    assert dict(error.extra) == {"target": target, "id": 7}


@pytest.mark.parametrize(
    "fields",
    [
        {"id": ""},
        {"id": "x" * 65},
        {"id": True},
        {"id": 1.5},
        {"id": 2**53},
        {"id": ["a"]},
        {"timeout_ms": 0},
        {"timeout_ms": 300_001},
        {"timeout_ms": "100"},
        {"timeout_ms": True},
        {"queue": "yes"},
        {"queue": True, "target": "*"},
        {"queue": True, "target": "group:g"},
        {"queue": True, "id": None},
    ],
)
def test_bad_v2_fields_are_invalid_message(fields):
    data = {"target": "u1", "message": "m", "id": "c1", **fields}
    error = request_from_fields(data, POLICY)
    assert isinstance(error, ProtocolError), fields
    assert error.code is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize(
    "fields",
    [{"id": ""}, {"id": "x" * 65}, {"id": True}, {"id": 1.5}, {"id": 2**53}, {"id": -(2**53)}, {"timeout_ms": 0}],
)
def test_the_frame_parser_refuses_what_the_field_check_refuses(fields):
    """parse_request's typed fast path holds the same rules, so a bad frame reaches the explaining path."""
    error = parse_request(json.dumps({"target": "u1", "message": "m", "id": "c1", **fields}), POLICY)
    assert isinstance(error, ProtocolError), fields
    assert error.code is ErrorCode.INVALID_MESSAGE


def test_timeout_bounds_are_inclusive_and_named_in_the_detail():
    assert isinstance(request_from_fields({"target": "u", "message": "m", "timeout_ms": 1}, POLICY), Request)
    assert isinstance(request_from_fields({"target": "u", "message": "m", "timeout_ms": 300_000}, POLICY), Request)
    error = request_from_fields({"target": "u", "message": "m", "timeout_ms": 300_001, "id": 3}, POLICY)
    assert isinstance(error, ProtocolError)
    assert "300000" in error.detail
    assert dict(error.extra)["id"] == 3


def test_command_id_rules():
    assert is_valid_command_id("x" * 64)
    assert is_valid_command_id(0)
    assert is_valid_command_id(-(2**53 - 1))
    assert not is_valid_command_id("x" * 65)
    assert not is_valid_command_id(False)
    assert not is_valid_command_id(None)


def test_not_json_and_not_an_object_keep_their_v1_codes():
    assert parse_request("nope", POLICY).code is ErrorCode.INVALID_JSON
    assert parse_request("[1]", POLICY).code is ErrorCode.INVALID_MESSAGE


def test_target_kind_never_confuses_ids_with_broadcast_or_groups():
    assert target_kind("group") is TargetKind.CLIENT  # a plain id that happens to be called "group"
    assert target_kind("*") is TargetKind.BROADCAST
    assert target_kind("group:g") is TargetKind.GROUP
    assert target_kind("a*") is None


def test_groups_parameter():
    assert parse_groups(None) == ()
    assert parse_groups("") == ()
    assert parse_groups("red,blue,red") == ("red", "blue")
    assert parse_groups("bad name") == "group names must match ^[a-zA-Z0-9_-]{1,50}$"
    assert parse_groups("a,,b").startswith("group names")
    assert parse_groups(",".join(f"g{i}" for i in range(MAX_GROUPS))) == tuple(f"g{i}" for i in range(MAX_GROUPS))
    assert parse_groups(",".join(f"g{i}" for i in range(MAX_GROUPS + 1))) == f"at most {MAX_GROUPS} groups"


def test_client_command_frame_bytes():
    assert (
        encode_client_command("c-1", "LLM", "MoveForward 10") == '{"id":"c-1","from":"LLM","message":"MoveForward 10"}'
    )
    assert encode_client_command(None, "LLM", 'say "hi"') == '{"id":null,"from":"LLM","message":"say \\"hi\\""}'
    assert encode_client_command(5, "planner", "héllo") == '{"id":5,"from":"planner","message":"héllo"}'


def test_controller_reply_frame_bytes():
    assert encode_controller_reply("c-1", "u1", "done", 12.34567) == (
        '{"reply_to":"c-1","sender":"u1","message":"done","rtt_ms":12.346}'
    )


@pytest.mark.parametrize(
    "rtt_ms", [0.0, 0.0004, 0.0005, 0.0015, 0.1234567, 1.0, 2.5005, 999.9995, 12345.6789, 6e4, 1e-7]
)
def test_controller_reply_rtt_is_rounded_to_three_decimals(rtt_ms):
    # The frame rounds without round(x, 3) (slow): the same figure, but for a half-way
    # tie (0.0005), which may go the other way in the last decimal.
    frame = json.loads(encode_controller_reply(1, "u1", "m", rtt_ms))
    assert frame["rtt_ms"] == pytest.approx(round(rtt_ms, 3), abs=0.0010001)
    assert abs(frame["rtt_ms"] - rtt_ms) <= 0.0005 + 1e-12
    assert len(repr(frame["rtt_ms"]).split(".")[1]) <= 3


def test_status_frame_bytes():
    assert encode_status("c-1", Status.DELIVERED, "u1") == '{"id":"c-1","status":"delivered","target":"u1"}'
    assert encode_status(9, Status.DELIVERED, "*", count=3) == '{"id":9,"status":"delivered","target":"*","count":3}'
    assert encode_status("q", Status.QUEUED, "u1", expires_in_ms=5000) == (
        '{"id":"q","status":"queued","target":"u1","expires_in_ms":5000}'
    )
    assert encode_status("t", Status.TIMEOUT, "u1", timeout_ms=100) == (
        '{"id":"t","status":"timeout","target":"u1","timeout_ms":100}'
    )


@pytest.mark.parametrize(
    "command_id",
    [0, -7, 2**53 - 1, -(2**53 - 1), "c-1", 'a"b', "back\\slash", "ü€😀", "\x00\x1f\x7f", "\u2028", "x" * 64],
)
def test_the_delivered_template_writes_the_bytes_of_the_encoded_object(command_id):
    expected = json.dumps(
        {"id": command_id, "status": "delivered", "target": "u-1_A"}, separators=(",", ":"), ensure_ascii=False
    )
    assert encode_delivered(command_id, "u-1_A") == encode_status(command_id, Status.DELIVERED, "u-1_A") == expected
    assert json.loads(encode_delivered(command_id, "u-1_A"))["id"] == command_id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"reply_to": "c-1", "message": "done"}', ClientReply("c-1", "done")),
        ('{"reply_to": 4, "message": ""}', ClientReply(4, "")),
        ("done", None),
        ('{"reply_to": "c-1"}', None),
        ('{"reply_to": "c-1", "message": "m", "extra": 1}', None),  # the client's own JSON, not a reply
        ('{"reply_to": true, "message": "m"}', None),
        # The id rule of is_valid_command_id, checked by the typed decoder itself.
        ('{"reply_to": "", "message": "m"}', None),
        (json.dumps({"reply_to": "x" * 65, "message": "m"}), None),
        (json.dumps({"reply_to": "x" * 64, "message": "m"}), ClientReply("x" * 64, "m")),
        (json.dumps({"reply_to": "😀" * 64, "message": "m"}), ClientReply("😀" * 64, "m")),  # characters, not bytes
        (json.dumps({"reply_to": 2**53, "message": "m"}), None),
        (json.dumps({"reply_to": -(2**53), "message": "m"}), None),
        (json.dumps({"reply_to": -(2**53 - 1), "message": "m"}), ClientReply(-(2**53 - 1), "m")),
        ('{"reply_to": 1.5, "message": "m"}', None),
        ('{"reply_to": "c-1", "message": 5}', None),
        ('{"reply_to": "c-1", "message": "m"', None),
        ("[1, 2]", None),
    ],
)
def test_client_reply_parsing_treats_anything_else_as_plain_text(text, expected):
    assert parse_client_reply(text) == expected
