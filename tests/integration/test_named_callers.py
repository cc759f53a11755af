"""Named controller and admin tokens on a real appliance reading a real moto SSM: each agent and each
operator acts under its own name (recent commands, v2 "from", the audit trail) with its own rate-limit
bucket, over HTTP and /mcp alike; the Tokens page lists and rotates them like the other tokens."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import re
import uuid
from collections.abc import Iterator

import httpx
import httpx2
import pytest
from leak_scan import SCAN
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from moto_support import MotoServer, seed, unique_prefix
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, Appliance, timeout
from websockets.sync.client import connect

V2 = ["wsbridge.v2"]
AGENT_A, AGENT_B = "agent-a-token-0123456789abcdef", "agent-b-token-0123456789abcdef"
ALICE = "alice-admin-token-0123456789abcdef"
SCAN.add_secrets({"AGENT_A": AGENT_A, "AGENT_B": AGENT_B, "ALICE": ALICE})
BURST = 3


@pytest.fixture(scope="module")
def app() -> Iterator[Appliance]:
    moto = MotoServer().start()
    prefix = unique_prefix()
    seed(
        moto.ssm(),
        prefix,
        {
            "LLM_SECRET_TOKEN": CONTROLLER_TOKEN,
            "UNITY_CLIENT_TOKEN": CLIENT_TOKEN,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "controller_tokens/agent-a": AGENT_A,
            "controller_tokens/agent-b": AGENT_B,
            "admin_tokens/alice": ALICE,
        },
    )
    env = moto.appliance_env(
        prefix,
        TOKEN_ROTATION_ENABLED="true",
        CONTROLLER_TOKEN_NAME="planner",
        # A budget of BURST commands per token, hardly refilled while the test runs.
        CONTROLLER_RATE_LIMIT="0.001",
        CONTROLLER_RATE_BURST=str(BURST),
    )
    appliance = Appliance(env, name="named-callers")
    try:
        yield appliance.start()
    finally:
        appliance.stop()
        moto.stop()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def answering_client(app: Appliance, client_id: str):
    """A v2 client that answers every command and keeps the frames it got."""
    frames: list[dict] = []
    async with app.connect(client_id, subprotocols=V2) as ws:

        async def answer() -> None:
            async for raw in ws:
                frame = json.loads(raw)
                frames.append(frame)
                await ws.send(json.dumps({"reply_to": frame["id"], "message": "ok"}))

        task = asyncio.create_task(answer())
        try:
            yield frames
        finally:
            task.cancel()


async def post(http: httpx.AsyncClient, token: str, target: str) -> httpx.Response:
    body = {"target": target, "message": "MoveForward 10", "wait_ms": int(timeout(5) * 1000)}
    return await http.post("/api/v1/commands", json=body, headers={"X-Auth-Token": token})


async def test_each_agent_has_its_own_name_and_bucket_over_http_and_mcp(app):
    target = uid("dev")
    async with answering_client(app, target) as frames, httpx.AsyncClient(base_url=app.http, timeout=30) as http:
        assert (await post(http, AGENT_A, target)).status_code == 200
        assert (await post(http, CONTROLLER_TOKEN, target)).status_code == 200  # CONTROLLER_TOKEN_NAME
        bearer = httpx2.AsyncClient(headers={"Authorization": f"Bearer {AGENT_B}"}, timeout=timeout(30))
        async with Client(streamable_http_client(f"{app.http}/mcp", http_client=bearer)) as mcp:
            sent = await mcp.call_tool("send_command", {"target": target, "message": "Jump", "timeout_seconds": 5})
        assert not sent.is_error, sent.content
        assert [frame["from"] for frame in frames] == ["agent-a", "planner", "agent-b"]
        detail = (await http.get(f"/api/v1/clients/{target}", headers={"X-Auth-Token": AGENT_A})).json()
        assert [entry["controller"] for entry in detail["recent_commands"]] == ["agent-b", "planner", "agent-a"]

        # agent-a spends the rest of its budget; agent-b, with one spent over MCP, still has its own.
        spent = [(await post(http, AGENT_A, target)).status_code for _ in range(BURST)]
        assert spent == [200] * (BURST - 1) + [429]
        assert (await post(http, AGENT_B, target)).status_code == 200
        # HTTP and MCP share one agent's bucket: it is the token's, not the transport's.
        assert (await post(http, AGENT_B, target)).status_code == 200
        refused = await post(http, AGENT_B, target)
        assert refused.status_code == 429 and refused.headers["retry-after"]


async def test_a_command_record_is_its_senders_own(app):
    """Two named callers may pick the same id: each reads its own record; no one else reads it (SECURITY.md)."""
    target, command_id = uid("dev"), uid("job")
    async with answering_client(app, target), httpx.AsyncClient(base_url=app.http, timeout=30) as http:
        for token, message in ((ALICE, "Unlock door"), (CONTROLLER_TOKEN, "MoveForward 10")):
            body = {"target": target, "message": message, "id": command_id, "wait_ms": int(timeout(5) * 1000)}
            sent = await http.post("/api/v1/commands", json=body, headers={"X-Auth-Token": token})
            assert sent.status_code == 200, sent.text

        async def read(token: str) -> httpx.Response:
            return await http.get(f"/api/v1/commands/{command_id}", headers={"X-Auth-Token": token})

        assert (await read(ALICE)).json()["message"] == "Unlock door"  # not overwritten by planner's command
        assert (await read(CONTROLLER_TOKEN)).json()["message"] == "MoveForward 10"
        for other in (AGENT_A, ADMIN_TOKEN):  # another named controller, the unnamed admin token
            refused = await read(other)
            assert refused.status_code == 404 and "Unlock" not in refused.text, refused.text
        bearer = httpx2.AsyncClient(headers={"Authorization": f"Bearer {AGENT_B}"}, timeout=timeout(30))
        async with Client(streamable_http_client(f"{app.http}/mcp", http_client=bearer)) as mcp:
            got = await mcp.call_tool("get_command", {"command_id": command_id})
        assert got.is_error and "Unlock" not in str(got.content), got.content


@contextlib.contextmanager
def v1_client(app: Appliance, client_id: str) -> Iterator[object]:
    """A v1 client held open until the block ends."""
    with connect(f"{app.ws}/ws/{client_id}", additional_headers={"X-Auth-Token": CLIENT_TOKEN}) as ws:
        yield ws


class Dashboard:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, follow_redirects=False, timeout=timeout(15))
        self.csrf = ""

    def get(self, path: str) -> httpx.Response:
        response = self.http.get(path)
        found = re.search(r'name="_csrf_token" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict) -> httpx.Response:
        return self.http.post(path, data={**data, "_csrf_token": self.csrf})


def test_the_audit_names_the_operator_and_named_tokens_rotate_from_the_tokens_page(app):
    target = uid("kicked")
    with httpx.Client(base_url=app.http, timeout=timeout(15)) as http, v1_client(app, target):
        deleted = http.delete(f"/api/v1/clients/{target}", headers={"X-Auth-Token": ALICE})
        assert deleted.status_code == 204
    alice = Dashboard(app.http)
    alice.get("/admin/login")
    assert alice.post("/admin/login", {"token": ALICE}).status_code == 303
    page = alice.get("/admin/tokens").text
    assert 'data-token="controller_tokens/agent-a"' in page and 'data-token="admin_tokens/alice"' in page
    assert "acts as <strong>agent-a</strong>" in page and AGENT_A not in page
    rotated = alice.post(
        "/admin/tokens/rotate", {"name": "controller_tokens/agent-b", "confirm": "controller_tokens/agent-b"}
    )
    assert rotated.status_code == 200 and 'id="new-token"' in rotated.text
    trail = list(csv.DictReader(io.StringIO(alice.get("/admin/audit.csv").text)))
    by_action = {(row["action"], row["target"]): row["actor"] for row in trail}
    assert by_action[("client.disconnect", target)] == "alice"
    assert by_action[("login", "")] == "alice"
    assert by_action[("token.rotate", "controller_tokens/agent-b")] == "alice"
    assert "ADMIN_TOKEN" not in {row["actor"] for row in trail}
