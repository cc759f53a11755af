"""The MCP tools, driven by the official MCP client: `wsbridge mcp` over stdio, and /mcp over streamable HTTP."""

import asyncio
import contextlib
import json
import sys
import tempfile
import uuid

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from support import CLIENT_TOKEN, CONTROLLER_TOKEN, ROOT, timeout

V2 = ["wsbridge.v2"]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def bridge(redis_server):
    from support import Appliance

    app = Appliance(redis_url=redis_server.url, name="mcp")
    app.start()
    yield app
    app.stop()


@contextlib.asynccontextmanager
async def answering_client(app, client_id, *, groups=None):
    """A v2 client that answers every command with 'ok: <message>'."""
    path = client_id + (f"?groups={groups}" if groups else "")
    async with app.connect(path, subprotocols=V2) as ws:

        async def answer():
            async for raw in ws:
                frame = json.loads(raw)
                await ws.send(json.dumps({"reply_to": frame["id"], "message": "ok: " + frame["message"]}))

        task = asyncio.create_task(answer())
        try:
            yield ws
        finally:
            task.cancel()


def stdio_client(app):
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "appliance", "mcp", "--url", app.http, "--token", CONTROLLER_TOKEN],
        cwd=tempfile.mkdtemp(prefix="wsb-mcp-"),  # no stray .env
        env={"PYTHONPATH": str(ROOT)},
    )
    return Client(params, read_timeout_seconds=timeout(30))


def http_client(app, token=CONTROLLER_TOKEN):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=timeout(30))
    return Client(streamable_http_client(f"{app.http}/mcp", http_client=http), read_timeout_seconds=timeout(30))


@pytest.fixture(params=["stdio", "http"])
def mcp_client(request, bridge):
    return stdio_client(bridge) if request.param == "stdio" else http_client(bridge)


async def test_tools_are_listed_with_descriptions_for_a_model(mcp_client):
    async with mcp_client as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == {"list_clients", "send_command", "broadcast", "describe_client", "get_command"}
    send = tools["send_command"]
    assert "ONE client" in send.description and "list_clients" in send.description
    assert send.input_schema["required"] == ["target", "message"]  # never a default target


async def test_send_command_returns_the_reply_and_list_clients_finds_the_client(mcp_client, bridge):
    target = uid("mcp")
    async with answering_client(bridge, target), mcp_client as client:
        listed = await client.call_tool("list_clients", {"id_prefix": target})
        assert not listed.is_error
        assert [c["id"] for c in listed.structured_content["clients"]] == [target]
        result = await client.call_tool("send_command", {"target": target, "message": "hello", "timeout_seconds": 5})
        assert not result.is_error, result.content
        assert result.structured_content["status"] == "replied"
        assert result.structured_content["reply"] == "ok: hello"
        assert result.structured_content["rtt_ms"] >= 0


async def test_errors_tell_the_model_what_to_do(mcp_client):
    async with mcp_client as client:
        offline = await client.call_tool("send_command", {"target": "nobody-mcp", "message": "x"})
        assert offline.is_error
        text = offline.content[0].text
        assert "not connected" in text and "list_clients" in text and "queue=true" in text
        wildcard = await client.call_tool("send_command", {"target": "*", "message": "x"})
        assert wildcard.is_error and "broadcast" in wildcard.content[0].text


async def test_broadcast_reports_the_count(mcp_client, bridge):
    group = uid("team")
    async with (
        answering_client(bridge, uid("m"), groups=group),
        answering_client(bridge, uid("m"), groups=group),
        mcp_client as client,
    ):
        result = await client.call_tool("broadcast", {"message": "go", "group": group})
        assert not result.is_error, result.content
        assert result.structured_content["count"] == 2
        waited = await client.call_tool("broadcast", {"message": "report", "group": group, "wait_seconds": 10})
        assert not waited.is_error, waited.content
        outcome = waited.structured_content
        assert (outcome["status"], outcome["count"], outcome["no_reply"]) == ("replied", 2, [])
        assert sorted(r["message"] for r in outcome["replies"]) == ["ok: report", "ok: report"]


@pytest.mark.parametrize(
    ("token", "status", "words"),
    [
        (None, 401, "Bearer <controller token> required"),
        ("not-a-token-of-this-bridge", 403, "not a token of this bridge"),
        (CLIENT_TOKEN, 403, "a client token cannot use /mcp"),
    ],
)
async def test_http_mcp_needs_the_controller_token_and_says_what_is_wrong(bridge, token, status, words):
    """Only a missing token answers 401: MCP clients take 401 as "start OAuth", which this bridge has not."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers) as http:
        response = await http.post(f"{bridge.http}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == status
    assert words in response.json()["detail"]
    assert ("www-authenticate" in response.headers) == (status == 401)
    if token:
        assert token not in response.text


async def test_tools_carry_titles_annotations_described_bounded_parameters_and_output_schemas(mcp_client):
    async with mcp_client as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    hints = {name: tool.annotations for name, tool in tools.items()}
    assert hints["list_clients"].read_only_hint is True and hints["list_clients"].open_world_hint is False
    for sender in ("send_command", "broadcast"):
        assert hints[sender].read_only_hint is False
        assert hints[sender].destructive_hint is True and hints[sender].idempotent_hint is False
        assert hints[sender].open_world_hint is True
    for tool in tools.values():
        assert tool.title, tool.name
        schema = tool.input_schema
        assert schema["additionalProperties"] is False, tool.name
        assert all(prop.get("description") for prop in schema["properties"].values()), tool.name
        assert tool.output_schema and tool.output_schema.get("properties"), tool.name
    limit = tools["list_clients"].input_schema["properties"]["limit"]
    assert (limit["minimum"], limit["maximum"]) == (1, 1000)
    send = tools["send_command"].input_schema["properties"]
    assert (send["timeout_seconds"]["minimum"], send["timeout_seconds"]["maximum"]) == (0.1, 300)
    assert send["target"]["pattern"]
    assert set(tools["send_command"].output_schema["properties"]) >= {"status", "reply", "rtt_ms"}
    assert set(tools["broadcast"].output_schema["properties"]) == {"status", "target", "count", "replies", "no_reply"}


BAD_CALLS = [
    ("list_clients", {"limit": 0}, "[invalid_argument] limit must be between 1 and 1000; 0 was given."),
    ("list_clients", {"limit": -2}, "[invalid_argument] limit must be between 1 and 1000; -2 was given."),
    (
        "send_command",
        {"target": "someone", "message": "x", "timeout_seconds": 1000000},
        "[invalid_argument] timeout_seconds must be between 0.1 and 300; 1e+06 was given.",
    ),
    ("list_clients", {"cursor": "not-a-cursor"}, "[invalid_cursor] The cursor is not one this bridge gave out."),
    ("send_command", {"target": "*", "message": "x"}, "[not_one_client] send_command needs one client id"),
]


async def test_bad_arguments_get_the_same_coded_error_over_stdio_and_http(bridge):
    """One set of checks in the tools: /mcp once answered limit=0 with [] and stdio with a 422."""
    answers: dict[str, list[str]] = {}
    for transport, client in (("stdio", stdio_client(bridge)), ("http", http_client(bridge))):
        async with client as session:
            for name, arguments, expected in BAD_CALLS:
                result = await session.call_tool(name, arguments)
                assert result.is_error, (transport, name, arguments, result)
                text = result.content[0].text
                assert expected in text, (transport, text)
                answers.setdefault(f"{name} {arguments}", []).append(text)
    assert all(len(set(texts)) == 1 for texts in answers.values()), answers


async def test_unknown_arguments_are_refused_not_ignored(mcp_client):
    async with mcp_client as client:
        result = await client.call_tool("send_command", {"target": "x", "message": "y", "timeout": 5})
    assert result.is_error
    assert "timeout" in result.content[0].text and "xtra" in result.content[0].text  # "Extra inputs are not permitted"


async def test_stdio_says_the_bridge_is_unreachable_with_a_code(tmp_path):
    from support import free_port

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "appliance", "mcp", "--url", f"http://127.0.0.1:{free_port()}", "--token", CONTROLLER_TOKEN],
        cwd=str(tmp_path),
        env={"PYTHONPATH": str(ROOT)},
    )
    async with Client(params, read_timeout_seconds=timeout(30)) as client:
        result = await client.call_tool("list_clients", {})
    assert result.is_error
    assert result.content[0].text.endswith(
        "[unreachable] The bridge cannot be reached (ConnectError). Retry in a few seconds."
    )


async def test_a_timeout_tells_the_model_not_to_resend(bridge):
    target = uid("slow")
    async with bridge.connect(target, subprotocols=V2), http_client(bridge) as client:  # never answers
        result = await client.call_tool(
            "send_command", {"target": target, "message": "MoveForward 10", "timeout_seconds": 0.5}
        )
    assert result.is_error
    text = result.content[0].text
    assert "[timeout]" in text and "Do not send it again" in text and "again with a larger" not in text


async def test_resources_and_prompts_are_advertised_and_filled(mcp_client, bridge):
    target = uid("res")
    async with answering_client(bridge, target), mcp_client as client:
        resources = (await client.list_resources()).resources
        assert [str(r.uri) for r in resources] == ["wsbridge://clients"]
        read = await client.read_resource("wsbridge://clients")
        listed = json.loads(read.contents[0].text)
        assert target in [c["id"] for c in listed["clients"]]
        prompts = (await client.list_prompts()).prompts
        assert [p.name for p in prompts] == ["drive_a_device"]
        prompt = await client.get_prompt("drive_a_device", {"goal": "open the door"})
        text = prompt.messages[0].content.text
        assert "list_clients" in text and "Goal: open the door" in text


async def test_http_mcp_sessions_work_across_two_instances_without_sticky_sessions(redis_server):
    """docker-compose.prod.yml runs two replicas behind Traefik without sticky sessions.

    Spoken as the MCP Inspector and the TypeScript client speak it (``initialize``, then the
    ``mcp-session-id`` it returned), each request on the next instance: a session kept in one
    instance's memory answered ``404 Session not found`` on the other.
    """
    from support import Appliance

    a = Appliance(redis_url=redis_server.url, name="mcp-rr-a")
    b = Appliance(redis_url=redis_server.url, name="mcp-rr-b")
    await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
    instances = [a, b]
    session: dict[str, str] = {}

    async def rpc(http: httpx2.AsyncClient, n: int, method: str, params: dict | None = None) -> dict | None:
        message: dict = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not method.startswith("notifications/"):
            message["id"] = n
        response = await http.post(f"{instances[n % 2].http}/mcp", json=message, headers=session)
        assert response.status_code in (200, 202), (method, instances[n % 2].name, response.status_code, response.text)
        if "mcp-session-id" in response.headers:
            session["mcp-session-id"] = response.headers["mcp-session-id"]
        if response.status_code == 202:
            return None
        if response.headers["content-type"].startswith("text/event-stream"):
            data = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
            return json.loads(data[-1])
        return response.json()

    try:
        target = uid("rr")
        headers = {"Authorization": f"Bearer {CONTROLLER_TOKEN}", "Accept": "application/json, text/event-stream"}
        async with answering_client(a, target), httpx2.AsyncClient(headers=headers, timeout=timeout(30)) as http:
            init = await rpc(
                http,
                0,
                "initialize",
                {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "rr", "version": "1"}},
            )
            assert init is not None and "serverInfo" in init["result"]
            await rpc(http, 1, "notifications/initialized")
            listed = await rpc(http, 3, "tools/list")  # on b
            assert listed is not None
            assert {tool["name"] for tool in listed["result"]["tools"]} >= {"send_command", "list_clients"}
            for n in (4, 5):  # one call on each instance; the client sits on a
                call = {"name": "send_command", "arguments": {"target": target, "message": f"m{n}"}}
                sent = await rpc(http, n, "tools/call", call)
                assert sent is not None and not sent["result"].get("isError"), sent
                assert sent["result"]["structuredContent"]["reply"] == f"ok: m{n}"
    finally:
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))


async def test_get_command_over_stdio_finds_the_reply_of_a_command_sent_without_waiting(bridge):
    """The stdio tools reach GET /api/v1/commands/{id} (tests/integration/test_command_followup.py: /mcp, cluster)."""
    target = uid("follow")
    async with answering_client(bridge, target), stdio_client(bridge) as client:
        sent = await client.call_tool("send_command", {"target": target, "message": "ping", "wait": False})
        assert not sent.is_error, sent.content
        assert sent.structured_content["status"] == "delivered"
        command_id = sent.structured_content["id"]
        followed = await client.call_tool("get_command", {"command_id": command_id, "wait_seconds": 10})
        assert not followed.is_error, followed.content
        assert (followed.structured_content["status"], followed.structured_content["reply"]) == ("replied", "ok: ping")
        missing = await client.call_tool("get_command", {"command_id": uid("never")})
        assert missing.is_error and "[unknown_command]" in missing.content[0].text


async def test_a_listener_on_stateless_http_mcp_hears_when_a_client_speaks_and_reads_its_messages(bridge):
    speaker, other = uid("speaks"), uid("quiet")
    uri = f"wsbridge://clients/{speaker}/messages"
    async with bridge.connect(speaker) as talker, bridge.connect(other) as noisy, http_client(bridge) as client:
        templates = (await client.list_resource_templates()).resource_templates
        assert "wsbridge://clients/{client_id}/messages" in [t.uri_template for t in templates]
        async with client.listen(resource_subscriptions=[uri]) as subscription:
            assert subscription.honored.resource_subscriptions == [uri]
            await noisy.send("another client's text")  # Not subscribed: no notification for it.
            await talker.send("status: docked")
            async with asyncio.timeout(timeout(10)):
                event = await anext(subscription)
            assert str(event.uri) == uri
        read = json.loads((await client.read_resource(uri)).contents[0].text)
        assert [m["message"] for m in read["messages"]] == ["status: docked"]
        assert read["messages"][0]["sender"] == speaker


async def test_describe_client_and_the_manifest_check_work_over_stdio_too(bridge):
    """stdio reaches the manifest through GET /api/v1/clients/{id}; /mcp is tested in test_manifest.py."""
    target = uid("declared")
    async with bridge.connect(target, subprotocols=V2) as ws, stdio_client(bridge) as client:
        await ws.send(json.dumps({"type": "manifest", "commands": [{"name": "Wave", "description": "Waves"}]}))
        assert json.loads(await ws.recv()) == {"type": "manifest_accepted", "commands": 1}
        described = await client.call_tool("describe_client", {"target": target})
        assert not described.is_error, described.content
        assert described.structured_content["usage"] == ["Wave — Waves"]
        refused = await client.call_tool("send_command", {"target": target, "message": "Wave twice"})
        assert refused.is_error and "[invalid_arguments]" in refused.content[0].text
        assert "Wave takes no arguments" in refused.content[0].text
        offline = await client.call_tool("describe_client", {"target": uid("nobody")})
        assert offline.is_error and "[target_offline]" in offline.content[0].text
