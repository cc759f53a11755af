"""The command manifest in the sans-I/O core: the frame's validation, commands checked against it, the session."""

import json

import pytest

from appliance.core.manifest import (
    MANIFEST_BURST,
    MANIFESTS_PER_SECOND,
    MAX_COMMANDS,
    MAX_MANIFEST_BYTES,
    ManifestError,
    bind_arguments,
    check_command,
    encode_manifest_accepted,
    encode_manifest_error,
    manifest_frame,
    parse_manifest,
)
from appliance.core.protocol import Role
from appliance.core.session import DeclareManifest, Limits, Publish, ReplyOrPublish, Session, Throttle

MOVE = {
    "name": "MoveForward",
    "description": "Moves forward",
    "arguments": {
        "type": "object",
        "properties": {
            "distance": {"type": "number", "description": "metres", "minimum": 0, "maximum": 100},
            "speed": {"type": "integer"},
        },
        "required": ["distance"],
    },
}
SAY = {"name": "Say", "arguments": {"properties": {"text": {"type": "string"}}, "required": ["text"]}}
LIGHT = {
    "name": "Light",
    "arguments": {
        "properties": {"on": {"type": "boolean"}, "color": {"type": "string", "enum": ["red", "green"]}},
        "required": ["on"],
    },
}
PING = {"name": "Ping"}


def manifest(*commands):
    parsed = parse_manifest(manifest_frame(list(commands)))
    assert isinstance(parsed, dict), parsed
    return parsed


def test_a_manifest_is_normalized():
    parsed = manifest(MOVE, PING)
    assert [c["name"] for c in parsed["commands"]] == ["MoveForward", "Ping"]
    assert parsed["commands"][1] == {
        "name": "Ping",
        "description": "",
        "arguments": {"type": "object", "properties": {}, "required": []},
    }
    assert parsed["commands"][0]["arguments"]["properties"]["distance"] == {
        "type": "number",
        "description": "metres",
        "minimum": 0,
        "maximum": 100,
    }


def test_the_unity_package_frame_is_accepted():
    """CommandDispatcher.ManifestJson's exact shape (tests/integration/unity checks the C# side)."""
    text = (
        '{"type":"manifest","commands":[{"name":"Blink","description":"","arguments":{"type":"object",'
        '"properties":{},"required":[]}},{"name":"SetColor","description":"Sets the color","arguments":'
        '{"type":"object","properties":{"color":{"type":"string","description":"a name"}},"required":["color"]}}]}'
    )
    parsed = parse_manifest(text)
    assert isinstance(parsed, dict) and [c["name"] for c in parsed["commands"]] == ["Blink", "SetColor"]


@pytest.mark.parametrize(
    "text",
    [
        "MoveForward 10",
        '{"reply_to": 1, "message": "manifest"}',
        '{"type": "status", "manifest": 1}',
        "[1, 2]",
        '{"type": "manifest"',  # not JSON: plain text for the controllers, as before
    ],
)
def test_other_frames_are_no_manifest(text):
    assert parse_manifest(text) is None


@pytest.mark.parametrize(
    ("commands", "path", "words"),
    [
        ("nope", "commands", "list"),
        ([{"name": "two words"}], "commands[0].name", "one word"),
        ([{"name": ""}], "commands[0].name", "one word"),
        ([42], "commands[0]", "object"),
        ([{"name": "A", "extra": 1}], "commands[0].extra", "unknown field"),
        ([{"name": "Go"}, {"name": "GO"}], "commands[1].name", "declared twice"),
        ([{"name": "A", "description": 5}], "commands[0].description", "string"),
        ([{"name": "A", "description": "x" * 1001}], "commands[0].description", "1000"),
        ([{"name": "A", "arguments": []}], "commands[0].arguments", "JSON Schema"),
        ([{"name": "A", "arguments": {"type": "array"}}], "commands[0].arguments.type", '"object"'),
        ([{"name": "A", "arguments": {"properties": {"x": {"type": "date"}}}}], "properties.x.type", "one of"),
        ([{"name": "A", "arguments": {"properties": {"1x": {"type": "string"}}}}], "properties.1x", "letter"),
        ([{"name": "A", "arguments": {"properties": {"x": {"type": "string"}}, "required": ["y"]}}], "required", "'y'"),
        (
            [
                {
                    "name": "A",
                    "arguments": {"properties": {"x": {"type": "string"}, "y": {"type": "string"}}, "required": ["y"]},
                }
            ],
            "required",
            "come first",
        ),
        ([{"name": "A", "arguments": {"properties": {"x": {"type": "integer", "enum": ["a"]}}}}], "x.enum", "integer"),
        ([{"name": "A", "arguments": {"properties": {"x": {"type": "string", "minimum": 1}}}}], "x.minimum", "numbers"),
        (
            [{"name": "A", "arguments": {"properties": {"x": {"type": "string", "format": "uri"}}}}],
            "x.format",
            "unknown",
        ),
        ([{"name": f"c{i}"} for i in range(MAX_COMMANDS + 1)], "commands", str(MAX_COMMANDS)),
    ],
)
def test_a_bad_manifest_names_the_field(commands, path, words):
    error = parse_manifest(json.dumps({"type": "manifest", "commands": commands}))
    assert isinstance(error, ManifestError)
    assert error.code == "invalid_manifest"
    assert error.path.endswith(path) and words in error.detail, error
    frame = json.loads(encode_manifest_error(error))
    assert frame == {"type": "manifest_error", "error": "invalid_manifest", "detail": error.detail, "path": error.path}


def test_unknown_top_level_fields_and_size_are_refused():
    error = parse_manifest('{"type": "manifest", "commands": [], "version": 3}')
    assert isinstance(error, ManifestError) and error.path == "version"
    big = manifest_frame([{"name": "A", "description": "x" * 1000}] * 40)
    assert len(big) > MAX_MANIFEST_BYTES
    error = parse_manifest(big)
    assert isinstance(error, ManifestError) and str(MAX_MANIFEST_BYTES) in error.detail


def test_an_empty_manifest_declares_no_commands():
    empty = manifest()
    assert json.loads(encode_manifest_accepted(empty)) == {"type": "manifest_accepted", "commands": 0}
    error = check_command(empty, "Anything")
    assert error is not None and error.code == "unknown_command" and "none" in error.detail


@pytest.mark.parametrize(
    "message",
    ["MoveForward 10", "moveforward 2.5 3", "MoveForward   0", "Say hello there world", "Light true red", "PING"],
)
def test_declared_commands_pass(message):
    assert check_command(manifest(MOVE, SAY, LIGHT, PING), message) is None


@pytest.mark.parametrize(
    ("message", "code", "words"),
    [
        (
            "Jump 3",
            "unknown_command",
            "'Jump' is not a declared command. Declared commands: MoveForward, Say, Light, Ping",
        ),
        ("", "unknown_command", "empty"),
        (
            "MoveForward",
            "invalid_arguments",
            "MoveForward needs distance. Usage: MoveForward <distance:number> [speed:integer]",
        ),
        ("MoveForward ten", "invalid_arguments", "distance must be a number; 'ten' is not"),
        ("MoveForward 101", "invalid_arguments", "from 0 to 100"),
        ("MoveForward 1 2.5", "invalid_arguments", "speed must be an integer"),
        ("MoveForward 1 2 3", "invalid_arguments", "takes 2 arguments; 3 were given"),
        ("MoveForward nan", "invalid_arguments", "must be a number"),
        ("Ping now", "invalid_arguments", "Ping takes no arguments"),
        ("Light yes", "invalid_arguments", "on must be a boolean"),
        ("Light false blue", "invalid_arguments", "color must be one of red, green"),
    ],
)
def test_undeclared_commands_say_why(message, code, words):
    error = check_command(manifest(MOVE, SAY, LIGHT, PING), message)
    assert error is not None and error.code == code and words in error.detail, error


def test_an_argument_beyond_pythons_int_digits_is_refused_not_raised():
    # int() refuses more than 4,300 digits with ValueError: that escaped check_command (MCP send_command).
    words = "9" * 5000
    error = check_command(manifest(MOVE), f"MoveForward 1 {words}")
    assert error is not None and error.code == "invalid_arguments" and "speed must be an integer" in error.detail
    assert len(error.detail) < 200, "a 64 KiB word is quoted cut, not whole"
    unknown = check_command(manifest(MOVE), "J" * 5000)
    assert unknown is not None and len(unknown.detail) < 200


def test_arguments_are_bound_typed():
    parsed = manifest(MOVE, SAY, LIGHT)
    move, say, light = parsed["commands"]
    assert bind_arguments(move, ["2.5", "+3"]) == {"distance": 2.5, "speed": 3}
    assert bind_arguments(say, ["hello", "world"]) == {"text": "hello world"}
    assert bind_arguments(light, ["TRUE"]) == {"on": True}


def session(v2=True):
    return Session("dev", Role.CLIENT, Limits(65536, 100.0, 100), 0.0, v2=v2)


def test_a_v2_client_declares_its_manifest():
    action = session().receive_text(manifest_frame([MOVE]), 1.0)
    assert type(action) is DeclareManifest and action.error is None
    assert action.manifest == manifest(MOVE)


def test_a_bad_manifest_is_answered_not_published():
    action = session().receive_text('{"type": "manifest", "commands": [{"name": "a b"}]}', 1.0)
    assert type(action) is DeclareManifest and action.manifest is None
    assert action.error is not None and action.error.path == "commands[0].name"


def test_manifest_frames_have_their_own_rate():
    # Each frame is parsed (~4 ms for 32 KiB on a busy host): at the message rate (1,000/s) one client would
    # hold the event loop for seconds a second. After the burst, reading pauses until the next is due.
    client, frame, now = session(), manifest_frame([MOVE]), 1.0
    for _ in range(MANIFEST_BURST):
        assert type(client.receive_text(frame, now)) is DeclareManifest
    throttled = client.receive_text(frame, now)
    assert type(throttled) is Throttle and type(throttled.then) is DeclareManifest
    assert throttled.seconds == pytest.approx(1 / MANIFESTS_PER_SECOND)
    assert type(client.receive_text("plain text", now)) is ReplyOrPublish, "other frames keep the message rate"


def test_v1_clients_and_other_json_are_unchanged():
    frame = manifest_frame([MOVE])
    assert type(session(v2=False).receive_text(frame, 1.0)) is Publish  # version 1: text for the controllers
    reply = '{"reply_to": 3, "message": "manifest ok"}'
    assert type(session().receive_text(reply, 1.0)) is ReplyOrPublish


def test_bridge_client_builds_its_manifest_from_its_handlers():
    from appliance.client import BridgeClient

    robot = BridgeClient("ws://h", "r1", "tok", v2=True)

    @robot.on_command("MoveForward", "Moves forward", arguments={"distance": {"type": "number"}})
    def move(distance):
        return f"moved {distance}"

    robot.register("Status", lambda: "idle", "Reports the state")
    robot.register("status", lambda: "busy", "Replaced: names ignore case")
    frame = json.loads(robot.manifest())
    assert frame["type"] == "manifest"
    assert [(c["name"], c["description"]) for c in frame["commands"]] == [
        ("MoveForward", "Moves forward"),
        ("status", "Replaced: names ignore case"),
    ]
    assert frame["commands"][0]["arguments"]["required"] == ["distance"]
    assert isinstance(parse_manifest(robot.manifest()), dict)
    with pytest.raises(ValueError, match=r"arguments\.properties\.when\.type"):
        robot.register("Wait", lambda when: when, arguments={"when": {"type": "date"}})
    with pytest.raises(ValueError, match="one word"):
        robot.register("two words", lambda: "")


async def test_bridge_client_dispatches_with_typed_arguments():
    from appliance.client import BridgeClient

    robot = BridgeClient("ws://h", "r1", "tok", v2=True)
    robot.register("Add", lambda a, b: str(a + b), arguments={"a": {"type": "integer"}, "b": {"type": "integer"}})

    async def later(text):
        return text.upper()

    robot.register("Shout", later, arguments={"text": {"type": "string"}})
    robot.register("Fail", lambda: 1 / 0)
    assert await robot._dispatch("add 2 3") == "5"
    assert await robot._dispatch("Shout hello  world") == "HELLO WORLD"
    assert (await robot._dispatch("Add 2")).startswith("error: Add needs b.")
    assert await robot._dispatch("Jump") == "error: unknown command Jump"
    assert await robot._dispatch("Fail") == "error: Fail: division by zero"


def test_a_refused_manifest_quotes_what_the_client_wrote_cut():
    long_name = "x" * 30_000
    for commands in (
        [{"name": "Ping", long_name: 1}],
        [{"name": "Ping", "arguments": {"properties": {"n": {"type": "integer", "enum": [long_name]}}}}],
        [{"name": "Ping", "arguments": {"properties": {long_name: {"type": "integer"}}}}],
    ):
        error = parse_manifest(manifest_frame(commands))
        assert isinstance(error, ManifestError) and len(error.detail) < 300 and len(error.path) < 300, error
