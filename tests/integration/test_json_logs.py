"""LOG_FORMAT=json on a real appliance: every line of its output is one JSON object, never a token."""

import asyncio
import json

from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, closed_with, command, eventually, recv

from appliance.logs import JSON_FIELDS


async def test_every_log_line_is_json_with_the_connection_on_connection_lines(start_appliance):
    app = start_appliance({"LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"}, name="jsonlogs")
    async with app.controller() as controller, app.connect("unity_client_1") as client:
        await controller.send(command("unity_client_1", "MoveForward 10"))
        assert await recv(client) == "MoveForward 10"
    async with app.connect("intruder", token=CONTROLLER_TOKEN[:-1] + "x") as refused:
        assert (await closed_with(refused))[0] == 4001
    await app.aget("/api/v1/clients", ADMIN_TOKEN)

    async def disconnects_logged() -> bool:
        return app.log().count("Disconnected") >= 2

    await eventually(disconnects_logged, 10, "the disconnect lines")
    await asyncio.to_thread(app.stop)  # Shutdown lines too.

    text = app.log()
    lines = [json.loads(line) for line in text.splitlines()]  # Fails on any line that is not JSON.
    assert len(lines) > 5
    for line in lines:
        assert {"ts", "level", "logger", "message", "instance"} <= set(line) <= set(JSON_FIELDS), line
        assert line["instance"] == "jsonlogs"
    connected = [line for line in lines if line["message"].startswith(("Connected as", "Disconnected"))]
    assert {line["client_id"] for line in connected} == {"LLM", "unity_client_1"}
    assert all(line["conn"] and line["role"] in ("controller", "client") for line in connected)
    refused_lines = [line for line in lines if line["message"].startswith("Refused connection")]
    assert [line["client_id"] for line in refused_lines] == ["intruder"]
    # uvicorn's own lines go through the same handler.
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    for token in (CONTROLLER_TOKEN, CLIENT_TOKEN, ADMIN_TOKEN, CONTROLLER_TOKEN[:-1] + "x"):
        assert token not in text
