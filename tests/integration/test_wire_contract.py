"""The seed's wire contract and every error frame, against both brokers, over real sockets."""

import contextlib
import json

import pytest
from support import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    CONTROLLER_TOKEN,
    TOKENS,
    closed_with,
    command,
    eventually,
    recv,
    recv_json,
)
from websockets.exceptions import ConnectionClosed


async def test_controller_command_reaches_client_as_exact_text(relay):
    async with relay.controller() as llm, relay.connect("unity_client_1") as unity:
        await llm.send('{"target": "unity_client_1", "message": "MoveForward 10"}')
        assert await recv(unity) == "MoveForward 10"


async def test_client_reply_reaches_controller_byte_for_byte(relay):
    async with relay.controller() as llm, relay.connect("unity_client_1") as unity:
        await unity.send("Movement completed")
        assert await recv(llm) == '{"sender":"unity_client_1","message":"Movement completed"}'


async def test_unicode_and_json_looking_text_pass_through_untouched(relay):
    text = '{"not": "parsed"} — héllo 🎮 "quoted"\n'
    async with relay.controller() as llm, relay.connect("c-unicode") as client:
        await llm.send(command("c-unicode", text))
        assert await recv(client) == text
        await client.send(text)
        assert json.loads(await recv(llm)) == {"sender": "c-unicode", "message": text}


async def test_every_controller_receives_client_replies(relay):
    async with relay.controller() as llm, relay.controller("planner-2") as other, relay.connect("c-fan") as client:
        await client.send("status ok")
        for controller in (llm, other):
            assert await recv_json(controller) == {"sender": "c-fan", "message": "status ok"}


async def test_messages_keep_their_order(relay):
    async with relay.controller() as llm, relay.connect("c-order") as client:
        for i in range(200):
            await llm.send(command("c-order", f"step {i}"))
        assert [await recv(client) for _ in range(200)] == [f"step {i}" for i in range(200)]


async def test_binary_utf8_frames_are_relayed_as_text(relay):
    async with relay.controller() as llm, relay.connect("c-bin") as client:
        await client.send(b"binary reply")
        assert await recv_json(llm) == {"sender": "c-bin", "message": "binary reply"}


# --- error frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("MoveForward 10", "invalid_json"),
        ('["unity_client_1", "x"]', "invalid_message"),
        ('{"message": "x"}', "invalid_message"),
        ('{"target": "unity_client_1"}', "invalid_message"),
        ('{"target": "not valid!", "message": "x"}', "invalid_target"),
    ],
)
async def test_bad_frames_get_error_frames_and_the_connection_stays(relay, frame, code):
    async with relay.controller() as llm, relay.connect("c-err") as client:
        await llm.send(frame)
        error = await recv_json(llm)
        assert error["error"] == code and error["detail"]
        await llm.send(command("c-err", "still works"))
        assert await recv(client) == "still works"


async def test_offline_target_gets_target_offline_error(relay):
    async with relay.controller() as llm:
        await llm.send(command("nobody_here", "hello", id="cmd-1"))
        assert await recv_json(llm) == {
            "error": "target_offline",
            "detail": "nobody_here is not connected",
            "target": "nobody_here",
            "id": "cmd-1",
        }


async def test_message_at_the_limit_passes_and_one_byte_more_is_refused(relay):
    limit = 65536
    envelope = len(command("c-size", ""))
    async with relay.controller() as llm, relay.connect("c-size") as client:
        fits = "x" * (limit - envelope)
        await llm.send(command("c-size", fits))
        assert await recv(client) == fits
        await llm.send(command("c-size", fits + "x"))
        error = await recv_json(llm)
        assert error["error"] == "message_too_large" and error["limit"] == limit


async def test_undecodable_binary_from_controller_gets_unsupported_frame(relay):
    async with relay.controller() as llm:
        await llm.send(b"\xff\xfe\x00")
        assert (await recv_json(llm))["error"] == "unsupported_frame"


async def test_a_newer_connection_with_the_same_id_replaces_the_old_one(relay):
    async with relay.controller() as llm, relay.connect("c-dup") as old:
        async with relay.connect("c-dup") as new:
            assert await closed_with(old) == (4010, "replaced by a newer connection")
            await llm.send(command("c-dup", "to the newer one"))
            assert await recv(new) == "to the newer one"


# --- handshake refusals and close codes -------------------------------------------------------


@pytest.mark.parametrize(
    ("client_id", "token", "code"),
    [
        ("unity_client_1", None, 4001),
        ("unity_client_1", "wrong-token", 4001),
        ("bad.id", CLIENT_TOKEN, 4002),
        ("x" * 51, CLIENT_TOKEN, 4002),
        ("LLM", CLIENT_TOKEN, 4003),
    ],
)
async def test_refused_handshakes_close_with_documented_code(relay, client_id, token, code):
    async with relay.connect(client_id, token) as ws:
        closed = await closed_with(ws)
    assert closed[0] == code and closed[1]


async def test_client_message_over_the_limit_closes_with_1009(relay):
    async with relay.connect("c-big") as client:
        await client.send("x" * 65537)
        assert (await closed_with(client))[0] == 1009


async def test_frame_over_transport_limit_closes_with_1009(relay):
    async with relay.controller("big-controller", max_size=None) as llm:
        with contextlib.suppress(ConnectionClosed):  # The server may cut us off mid-send.
            await llm.send("x" * (2 << 20))  # Transport limit: max(4 x 64 KiB, 1 MiB).
        assert (await closed_with(llm))[0] == 1009


async def test_undecodable_binary_from_client_closes_with_1007(relay):
    async with relay.connect("c-badbin") as client:
        await client.send(b"\xff\xfe")
        assert (await closed_with(client))[0] == 1007


# --- HTTP ---------------------------------------------------------------------------------------


def test_root_keeps_seed_shape_and_health_endpoints(relay):
    status, body = relay.get("/")
    assert status == 200 and set(body) == {"message", "version"}
    assert relay.get("/healthz") == (200, {"status": "ok"})
    status, body = relay.get("/readyz")
    assert status == 200 and body["status"] == "ready"


async def test_clients_endpoint_lists_live_connections(relay):
    async with relay.controller() as llm, relay.connect("c-presence") as client:
        await client.send("hi")
        await recv(llm)
        status, body = await relay.aget("/api/v1/clients", CONTROLLER_TOKEN)
        assert status == 200
        records = {r["id"]: r for r in body["clients"]}
        assert records["c-presence"]["role"] == "client"
        assert records["LLM"]["role"] == "controller"
        assert set(records["c-presence"]) == {
            "id",
            "role",
            "instance",
            "connected_since",
            "remote",
            "messages_in",
            "messages_out",
            "last_activity",
            "token",
            "token_version",
        }
        assert records["c-presence"]["messages_in"] == 1
        # Which token opened each connection (name and version; never the value), for `wsbridge tokens status`.
        assert (records["c-presence"]["token"], records["c-presence"]["token_version"]) == ("UNITY_CLIENT_TOKEN", 1)
        assert records["LLM"]["token"] == "LLM_SECRET_TOKEN"
        assert (await relay.aget("/api/v1/clients", ADMIN_TOKEN))[0] == 200


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong", 403), (CLIENT_TOKEN, 403)])
def test_clients_endpoint_needs_controller_or_admin_token(relay, token, status):
    assert relay.get("/api/v1/clients", token)[0] == status


def test_metrics_are_exposed(relay):
    status, body = relay.get("/metrics")
    assert status == 200
    assert "wsbridge_connections" in body and "wsbridge_messages_received_total" in body


async def test_no_token_ever_appears_in_the_log(relay):
    async with relay.connect("c-log", "attacker-supplied-token") as ws:
        await closed_with(ws)
    await eventually(lambda: _logged(relay, "Refused connection"), 5, "the refusal in the log")  # It is logged...
    log = relay.log()
    for secret in (*TOKENS, "attacker-supplied-token"):
        assert secret not in log  # ...without any token.


async def _logged(app, text):
    return text in app.log()
