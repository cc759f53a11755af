"""``python -m bench.ws_reply``: what protocol version 2 costs over version 1, on one instance.

The same closed loop twice against one appliance (embedded broker): a controller keeps
``--outstanding`` commands in flight to ``--clients`` echo clients and sends the next
one as soon as an answer comes back.

- ``v1``: commands without id, version-1 clients echo the text, the controller counts
  ``{"sender", "message"}`` frames (the seed's protocol);
- ``v2``: commands with an id, version-2 clients answer ``{"reply_to", "message"}``, the
  controller gets a ``delivered`` status frame and the ``reply_to`` frame per command.

The ratio v2/v1 of completed commands per second is the cost of ids, status frames and
correlation (issue 8: v2 costs at most 25 % of v1 throughput). ``--rounds`` alternates
v1 and v2 and reports medians; the server's CPU per command is reported too, the
figure a busy machine disturbs least.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from .http_reply import EchoClient
from .procs import Processes, free_port, process_tree, raise_nofile_limit, wait_http_ok

__all__ = ["main", "run"]

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class _Controller(WSListener):
    """Counts answers and sends the next command to the client that answered."""

    def __init__(self, v2: bool) -> None:
        self.v2 = v2
        self.transport: WSTransport | None = None
        self.completed = 0
        self.ids = itertools.count()
        self.frames = {}  # client id -> encoded command without id (v1)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def send(self, target: str) -> None:
        assert self.transport is not None
        if self.v2:  # As cheap as v1's prepared frames: the generator shares the machine with the server.
            self.transport.send(WSMsgType.TEXT, b"%s%d}" % (self.frames[target], next(self.ids)))
        else:
            self.transport.send(WSMsgType.TEXT, self.frames[target])

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
            return
        payload = frame.get_payload_as_bytes()
        if self.v2 and payload.startswith(b'{"id":') and b'"status":"delivered"' in payload:
            return  # progress, not an answer
        message = _decode(payload)
        if "error" in message:
            raise RuntimeError(f"error frame: {message}")
        if self.v2 and "reply_to" not in message:
            raise RuntimeError(f"unexpected frame: {message}")
        self.completed += 1
        self.send(message["sender"])


async def _loop(
    proc: Any, port: int, tokens: tuple[str, str], v2: bool, clients: int, outstanding: int, duration: float, rnd: int
) -> tuple[float, float, float]:
    """Completed commands per second, server and load generator CPU (us) per command, over ``duration``."""
    controller_token, client_token = tokens
    client_headers = {"X-Auth-Token": client_token}
    if v2:
        client_headers["Sec-WebSocket-Protocol"] = "wsbridge.v2"
    prefix = f"{'v2' if v2 else 'v1'}r{rnd}"
    ids = [f"{prefix}-{i}" for i in range(clients)]
    transports = [
        (await ws_connect(lambda: EchoClient(v2), f"ws://127.0.0.1:{port}/ws/{cid}", extra_headers=client_headers))[0]
        for cid in ids
    ]
    transport, controller = await ws_connect(
        lambda: _Controller(v2),
        f"ws://127.0.0.1:{port}/ws/bench-{prefix}",
        extra_headers={"X-Auth-Token": controller_token},
    )
    if v2:  # Completed with the id by _Controller.send.
        controller.frames = {
            cid: b'{"target":"%s","message":"ping","timeout_ms":60000,"id":' % cid.encode() for cid in ids
        }
    else:
        controller.frames = {cid: json.dumps({"target": cid, "message": "ping"}).encode() for cid in ids}
    for i in range(outstanding):
        controller.send(ids[i % clients])
    await asyncio.sleep(1.0)  # warm-up
    start_count, start, cpu = controller.completed, time.perf_counter(), proc.cpu_seconds()
    own_cpu = time.process_time()
    await asyncio.sleep(duration)
    done, cpu = controller.completed - start_count, proc.cpu_seconds() - cpu
    own_cpu = time.process_time() - own_cpu
    rate = done / (time.perf_counter() - start)
    transport.disconnect()
    for t in transports:
        t.disconnect()
    await asyncio.sleep(0.2)  # Let the server see them go before the next round.
    return rate, 1e6 * cpu / max(done, 1), 1e6 * own_cpu / max(done, 1)


async def run(
    clients: int,
    outstanding: int,
    duration: float,
    rounds: int = 1,
    wsbridge: Path | None = None,
    pin: bool = False,
    extra_settings: dict[str, str] | None = None,
) -> dict:
    raise_nofile_limit()
    tokens = (secrets.token_urlsafe(24), secrets.token_urlsafe(24))
    with tempfile.TemporaryDirectory(prefix="wsb-bench-ws-") as tmp, Processes(Path(tmp), wsbridge) as procs:
        port = free_port()
        settings = {"LLM_SECRET_TOKEN": tokens[0], "UNITY_CLIENT_TOKEN": tokens[1], "LOG_LEVEL": "WARNING"}
        settings.update(extra_settings or {})
        proc = procs.start_appliance("ws-reply", port, settings)
        await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
        if pin and len(os.sched_getaffinity(0)) >= 2:
            # The appliance on one core, this generator on another: neither moves nor evicts the other's caches.
            cores = sorted(os.sched_getaffinity(0))
            for pid in process_tree(proc.pid):
                os.sched_setaffinity(pid, {cores[0]})
            os.sched_setaffinity(0, {cores[1]})
        runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
        for rnd in range(rounds):  # Interleaved, so a busy spell on the machine hits both versions.
            for v2 in (False, True):
                runs[v2].append(await _loop(proc, port, tokens, v2, clients, outstanding, duration, rnd))
    v1, v2 = (statistics.median(r[0] for r in runs[k]) for k in (False, True))
    v1_cpu, v2_cpu = (statistics.median(r[1] for r in runs[k]) for k in (False, True))
    v1_gen, v2_gen = (statistics.median(r[2] for r in runs[k]) for k in (False, True))
    return {
        "clients": clients,
        "outstanding": outstanding,
        "rounds": rounds,
        "v1_per_s": v1,
        "v2_per_s": v2,
        "v2_over_v1": v2 / v1,
        # Server CPU per completed command: what a busy machine disturbs least.
        "v1_server_cpu_us": v1_cpu,
        "v2_server_cpu_us": v2_cpu,
        "v1_over_v2_cpu": v1_cpu / v2_cpu,
        # The load generator shares the machine: its CPU per command is taken from the server's.
        "v1_generator_cpu_us": v1_gen,
        "v2_generator_cpu_us": v2_gen,
        "per_round_v2_over_v1": [b[0] / a[0] for a, b in zip(runs[False], runs[True], strict=True)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_reply", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--outstanding", type=int, default=100, help="commands in flight (at most one per client)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per version and round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="v1 and v2 alternately, this many times; medians (one round swings)"
    )
    parser.add_argument(
        "--wsbridge",
        type=Path,
        default=None,
        help="the appliance executable (default: this venv's; e.g. another build)",
    )
    parser.add_argument(
        "--pin", action="store_true", help="pin the appliance and this generator to one core each (steadier figures)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an appliance setting for this run, e.g. RECENT_COMMANDS_PER_CLIENT=0 (repeatable)",
    )
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.setting)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(
        json.dumps(
            asyncio.run(
                run(
                    args.clients,
                    min(args.outstanding, args.clients),
                    args.duration,
                    args.rounds,
                    args.wsbridge.resolve() if args.wsbridge else None,
                    args.pin,
                    extra,
                )
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
