"""``python -m bench.http_reply``: request/reply over the HTTP API, requests/s and latency.

One appliance (embedded broker) on 127.0.0.1; ``--concurrency`` HTTP/1.1 keep-alive
connections each send ``POST /api/v1/commands`` with ``wait_ms`` to their own client
and wait for the reply, in a closed loop. The clients are version-2 (``wsbridge.v2``,
JSON reply) or version-1 (bare text, replies matched by order) picows echo clients.

The HTTP side is a minimal keep-alive client on asyncio streams rather than httpx:
at thousands of requests per second on a shared 2-core machine the load generator's
own cost must stay well below the server's, and httpx costs several times more per
request than the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from .loadgen import latency_summary
from .procs import Processes, free_port, raise_nofile_limit, wait_http_ok

__all__ = ["main", "run"]

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class EchoClient(WSListener):
    """A client that answers every command: v2 with ``reply_to``, v1 with the text back."""

    def __init__(self, v2: bool) -> None:
        self.v2 = v2

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if self.v2:
                command = _decode(payload)
                transport.send(WSMsgType.TEXT, _encode({"reply_to": command["id"], "message": command["message"]}))
            else:
                transport.send(WSMsgType.TEXT, payload)
        elif frame.msg_type is WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.disconnect()


async def _worker(port: int, token: str, target: str, stop_at: list[float], measure_from: list[float], out: dict):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"target": target, "message": "ping", "wait_ms": 5000}).encode()
    request = (
        b"POST /api/v1/commands HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"X-Auth-Token: " + token.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    latencies, statuses = out["latencies"], out["statuses"]
    try:
        while time.perf_counter() < stop_at[0]:
            started = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if time.perf_counter() >= measure_from[0]:
                latencies.append(time.perf_counter_ns() - started)
                statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run(concurrency: int, duration: float, warmup: float, v2: bool) -> dict:
    raise_nofile_limit()
    token, client_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="wsb-bench-http-") as tmp, Processes(Path(tmp)) as procs:
        port = free_port()
        proc = procs.start_appliance(
            "http-reply", port, {"LLM_SECRET_TOKEN": token, "UNITY_CLIENT_TOKEN": client_token, "LOG_LEVEL": "WARNING"}
        )
        await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
        headers = {"X-Auth-Token": client_token}
        if v2:
            headers["Sec-WebSocket-Protocol"] = "wsbridge.v2"
        transports = []
        for i in range(concurrency):
            transport, _ = await ws_connect(
                lambda: EchoClient(v2), f"ws://127.0.0.1:{port}/ws/rr-{i}", extra_headers=headers
            )
            transports.append(transport)
        now = time.perf_counter()
        measure_from, stop_at = [now + warmup], [now + warmup + duration]
        out: dict = {"latencies": [], "statuses": {}}
        cpu_before, own_before = proc.cpu_seconds(), time.process_time()
        await asyncio.gather(*(_worker(port, token, f"rr-{i}", stop_at, measure_from, out) for i in range(concurrency)))
        cpu, own = proc.cpu_seconds() - cpu_before, time.process_time() - own_before
        for transport in transports:
            transport.disconnect()
    ok = out["statuses"].get(200, 0)
    summary = latency_summary(sorted(out["latencies"]))
    return {
        "protocol": 2 if v2 else 1,
        "concurrency": concurrency,
        "requests_per_s": ok / duration,
        "statuses": out["statuses"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "server_cpu_percent": 100 * cpu / (duration + warmup),
        # The generator shares the machine: when it is near 100 %, it, not the server, is the limit.
        "generator_cpu_percent": 100 * own / (duration + warmup),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_reply", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--protocol", type=int, choices=(1, 2), default=2, help="version of the echo clients")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.concurrency, args.duration, args.warmup, args.protocol == 2))
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["statuses"] and set(result["statuses"]) == {200} else 1)


if __name__ == "__main__":
    main()
