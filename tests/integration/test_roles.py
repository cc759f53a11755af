"""Roles own their ids and controllers talk to clients only, on both brokers, across instances."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile

import pytest
from support import (
    CLIENT_TOKEN,
    CONTROLLER_TOKEN,
    closed_with,
    command,
    eventually,
    free_port,
    recv,
    recv_json,
    timeout,
)


@pytest.fixture(params=["memory", "redis"])
def two_instances(request, start_appliance):
    """Two instances sharing Redis, or one embedded instance playing both parts."""

    def start(env=None):
        if request.param == "memory":
            app = start_appliance(env, name="roles-mem")
            return app, app
        url = request.getfixturevalue("redis_server").url
        return (
            start_appliance(env, redis_url=url, name="roles-a"),
            start_appliance(env, redis_url=url, name="roles-b"),
        )

    return start


@pytest.mark.parametrize("policy", ["replace", "reject"])
async def test_a_client_token_never_takes_over_a_controllers_id(two_instances, policy):
    a, b = two_instances({"DUPLICATE_POLICY": policy})
    async with a.controller("planner-2") as planner, a.connect("device-1") as device:
        async with b.connect("planner-2") as intruder:  # The client token, the controller's id.
            code, reason = await closed_with(intruder)
        assert (code, reason) == (4004, "id is in use by a connection of the other role")
        # The controller is still connected and still gets its traffic.
        await device.send("still there?")
        assert await recv_json(planner) == {"sender": "device-1", "message": "still there?"}


@pytest.mark.parametrize("policy", ["replace", "reject"])
async def test_a_controller_token_never_takes_over_a_clients_id(two_instances, policy):
    a, b = two_instances({"DUPLICATE_POLICY": policy})
    async with a.connect("device-2") as device, a.controller() as llm:
        async with b.controller("device-2") as intruder:
            assert (await closed_with(intruder))[0] == 4004
        await llm.send(command("device-2", "MoveForward 10"))
        assert await recv(device) == "MoveForward 10"


async def test_an_id_may_change_role_once_it_is_free(two_instances):
    a, b = two_instances()
    async with a.controller("shifty"):
        pass
    async with a.controller() as llm, b.connect("shifty") as device:
        await llm.send(command("shifty", "now a client"))
        assert await recv(device, 10) == "now a client"


async def test_controllers_send_to_clients_only(two_instances):
    a, b = two_instances()
    async with a.controller() as llm, b.controller("planner") as planner:
        forged = '{"sender":"unity_client_1","message":"Movement completed"}'
        await llm.send(command("planner", forged, id=7))
        error = await recv_json(llm)
        assert (error["error"], error["target"], error["id"]) == ("target_not_client", "planner", 7)
        with pytest.raises(TimeoutError):  # Nothing reached the other controller.
            await asyncio.wait_for(planner.recv(), 0.5)


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "serve", "--port", "1"],  # Refused before it binds.
            cwd=cwd,
            env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **env},
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )


def test_the_same_token_for_both_roles_is_refused_at_start():
    result = _serve({"LLM_SECRET_TOKEN": CONTROLLER_TOKEN, "UNITY_CLIENT_TOKEN": CONTROLLER_TOKEN})
    assert result.returncode != 0
    assert "LLM_SECRET_TOKEN and UNITY_CLIENT_TOKEN are the same token" in result.stderr
    assert CONTROLLER_TOKEN not in result.stdout + result.stderr


def test_a_short_token_is_refused_at_start():
    result = _serve({"LLM_SECRET_TOKEN": "short", "UNITY_CLIENT_TOKEN": CLIENT_TOKEN})
    assert result.returncode != 0
    assert "LLM_SECRET_TOKEN is shorter than 16 characters" in result.stderr


def test_generated_dev_tokens_pass_the_checks():
    with socket.socket() as taken, tempfile.TemporaryDirectory() as cwd:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # The port is taken, so the server stops right after the checks, when it tries to bind.
        port = str(taken.getsockname()[1])
        result = subprocess.run(
            [sys.executable, "-m", "appliance", "serve", "--host", "127.0.0.1", "--port", port],
            cwd=cwd,
            env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )
    output = result.stdout + result.stderr
    assert "generated dev tokens" in output and "address already in use" in output
    assert "refusing to start" not in output


async def test_the_redis_url_never_shows_in_logs_or_answers(start_appliance):
    password = "hunter2-redis-password-xyz"
    app = start_appliance(
        {"REDIS_URL": f"redis://:{password}@127.0.0.1:{free_port()}/0"}, name="secret-url", wait_ready=False
    )
    status, body = await app.aget("/readyz")
    assert status == 503 and password not in str(body)

    async def failure_logged():
        return "not reachable" in app.log()

    await eventually(failure_logged, 15, "the start-up warning about Redis")
    assert password not in app.log()
