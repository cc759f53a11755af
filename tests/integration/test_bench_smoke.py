"""Smoke test of ``bench/``: the benchmark command runs end to end on a tiny scenario.

Not a performance test (no figure is compared with a target here: timing
assertions on a shared 2-core machine would be flaky). It checks that the load
generator and the reference relay speak the wire contract and account for every
command, so that the real benchmark's figures can be trusted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from support import ROOT, eventually, free_port, http_aget, timeout
from websockets.asyncio.client import connect


def _run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--targets", "reference", "--json", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| figure | reference |" in result.stdout  # the table was printed
    return json.loads(out.read_text())["results"]["reference"]


def test_generator_answers_every_command_against_the_reference_relay(tmp_path: Path) -> None:
    results = _run_bench(
        tmp_path,
        "--scenarios",
        "closed,open,fanout,memory",
        "--clients",
        "5",
        "--outstanding",
        "10",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--rates",
        "200",
        "--fanout-clients",
        "5",
        "--fanout-repeats",
        "2",
        "--memory-clients",
        "50",
        "--rounds",
        "1",
        "--quiet-wait",
        "0",  # a smoke test does not wait for a quiet machine
    )

    closed = results["closed"]
    assert closed["round_trips"] > 0
    assert closed["round_trips_per_s"] > 0
    assert closed["unanswered"] == 0
    assert closed["errors"] == 0
    assert closed["stray_replies"] == 0
    assert closed["latency"]["count"] == closed["round_trips"]
    assert 0 < closed["latency"]["p50_ms"] <= closed["latency"]["p99_ms"]

    open_loop = results["open_200"]
    assert open_loop["sent"] == 240  # 200/s for 0.2 s warm-up + 1 s measured
    assert open_loop["unanswered"] == 0
    assert open_loop["errors"] == 0
    assert open_loop["latency"]["count"] == 200
    assert 0 < open_loop["latency"]["p50_ms"] <= open_loop["latency"]["p99_ms"]

    fanout = results["fanout"]
    assert fanout["incomplete"] == 0
    assert fanout["errors"] == 0
    assert 0 < fanout["delivered_median_ms"] <= fanout["replied_median_ms"]

    memory = results["memory"]["50"]
    assert memory["connected"] == 50
    assert memory["open"] == 50
    assert memory["kib_per_conn"] > 0

    assert results["server_closes"] == {}
    assert results["connect_failures"] == {}


async def test_reference_relay_speaks_the_wire_contract(tmp_path: Path) -> None:
    """Checked with an independent client library, so the generator cannot hide a mistake of its own."""
    port = free_port()
    token = "smoke-controller-token"
    relay = subprocess.Popen(
        [sys.executable, "-m", "bench.relay", "--port", str(port), f"--controller-token={token}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: _healthy(port), within=10, message="reference relay /healthz")
        url = f"ws://127.0.0.1:{port}/ws"
        async with (
            connect(f"{url}/LLM", additional_headers={"X-Auth-Token": token}) as controller,
            connect(f"{url}/unity-1", additional_headers={"X-Auth-Token": "any client token"}) as client,
        ):
            await controller.send('{"target": "unity-1", "message": "move \\"left\\" ü"}')
            command = await asyncio.wait_for(client.recv(), timeout(5))
            assert command == 'move "left" ü'
            await client.send("done ü")
            reply = await asyncio.wait_for(controller.recv(), timeout(5))
            assert reply == '{"sender":"unity-1","message":"done ü"}'
            await controller.send('{"target": "nobody", "message": "x"}')
            error = json.loads(await asyncio.wait_for(controller.recv(), timeout(5)))
            assert error["error"] == "target_offline"
    finally:
        relay.terminate()
        relay.wait(timeout=10)


async def _healthy(port: int) -> bool:
    try:
        return (await http_aget(f"http://127.0.0.1:{port}/healthz"))[0] == 200
    except httpx.TransportError:
        return False


def test_http_request_reply_bench_gets_every_reply() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for protocol in ("1", "2"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.http_reply",
                "--concurrency",
                "4",
                "--duration",
                "0.5",
                "--protocol",
                protocol,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout(60),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        figures = json.loads(result.stdout)
        assert set(figures["statuses"]) == {"200"} and figures["requests_per_s"] > 0, figures


def test_ws_request_reply_bench_compares_v1_and_v2() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "bench.ws_reply", "--clients", "4", "--duration", "0.5", "--rounds", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout)
    assert figures["v1_per_s"] > 0 and figures["v2_per_s"] > 0, figures
