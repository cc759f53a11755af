"""A bounded soak: steady traffic with reconnecting clients on two instances sharing Redis.

``python -m bench.soak`` deploys the ``redis`` target (Redis and two instances; the
controller on A, the clients on B, so every command crosses Redis), connects
``--clients`` echoing clients, then for ``--soak-minutes`` sends ``--rate`` commands per
second on a fixed schedule while ``--reconnect-percent`` of the clients drop and
reconnect every second. It reports:

- RSS and open file descriptors of both instances and Redis, sampled every 5 s, with the
  slope after warm-up (least squares; flat means no leak);
- every command's outcome, by its ``id``: **answered** (the ``reply_to`` frame), **reported**
  (``timeout``, or an error frame, by code), **lost** (no outcome at all) or **duplicated** (a
  second final outcome). Commands carry ``"queue": true`` (``--no-queue`` for the old mode, where
  a command for a reconnecting client gets ``target_offline``) and ``--timeout-ms`` (10 s); the soak
  waits for every outcome, up to ``timeout_ms`` + 5 s after the last command, and exits 1 if any
  command was lost or duplicated;
- latency from the scheduled send time (no coordinated omission): p50/p99 of the first
  (after warm-up) and the last window (a minute each, or a third of a shorter run), for all
  replies and for those not queued while their client reconnected.

Do not run the full 10 minutes on a shared machine; ``--soak-minutes 1`` is the smoke.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec
import redis
from picows import WSFrame, WSListener, WSMsgType, WSTransport

from .loadgen import LoadGenerator, latency_summary
from .procs import Processes, raise_nofile_limit
from .runner import _deploy, _ids, _Tokens

__all__ = ["main", "run_soak", "slope"]

_now = time.perf_counter_ns
SAMPLE_SECONDS = 5.0
#: Commands to a client dropped within this many seconds of their send count as churn-affected.
CHURN_MARGIN_S = 2.0
#: Commands carry this timeout_ms by default: reconnecting clients are back well within it.
DEFAULT_TIMEOUT_MS = 10_000
#: After the last command, wait this much beyond timeout_ms for the outcomes still due.
OUTCOME_MARGIN_S = 5.0


class _Frame(msgspec.Struct):
    sender: str | None = None
    message: str | None = None
    error: str | None = None
    id: int | None = None
    status: str | None = None  # Version 2 status frames (the commands carry an id).
    reply_to: int | None = None  # The reply, to this controller only: the command's outcome.


_decode = msgspec.json.Decoder(_Frame).decode


class _SoakController(WSListener):
    """Sends commands with an ``id`` and counts the outcome the relay reports for each id.

    The reply is the ``reply_to`` frame (the relay's match), not the plain ``{"sender", ...}``
    copy every controller gets; a reply whose text is another command's echo is counted as
    mismatched (version-1 clients are matched by order).
    """

    def __init__(self, soak: _Soak) -> None:
        self.soak = soak
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                self.soak.controller_closed = True
                transport.disconnect()
            return
        incoming = _decode(frame.get_payload_as_bytes())
        now = _now()
        soak = self.soak
        if incoming.reply_to is not None:
            soak.replied(incoming.reply_to, incoming.message or "", now)
        elif incoming.error is not None:
            soak.reported(incoming.id, incoming.error, now)
        elif incoming.status is not None and incoming.id is not None:
            if incoming.status == "timeout":  # No reply within the command's timeout_ms: a final outcome.
                soak.reported(incoming.id, "timeout", now)
            elif incoming.status == "delivered":
                soak.delivered[incoming.id] = 1
            elif incoming.status == "queued":
                soak.queued[incoming.id] = 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        self.soak.controller_closed = True


class _Soak:
    """Every command's outcome by id: 0 none yet, 1 replied, 2 reported (timeout or an error code)."""

    def __init__(self, total: int) -> None:
        self.scheduled = [0] * total
        self.target = [0] * total
        self.outcome = bytearray(total)
        self.finished = [0] * total  # when the final outcome arrived (ns)
        self.delivered = bytearray(total)  # a "delivered" status came
        self.queued = bytearray(total)  # a "queued" status came
        self.latency = [0] * total
        self.errors: Counter[str] = Counter()  # final outcomes other than a reply, by status or error code
        self.errors_without_id: Counter[str] = Counter()
        self.code: dict[int, str] = {}  # the status or error code of each reported command
        self.controller_closed = False
        self.duplicates = 0  # a second final outcome for one id
        self.mismatched = 0  # a reply whose text echoes another command

    def _final(self, seq: int, kind: int, now: int) -> bool:
        if not 0 <= seq < len(self.outcome):
            self.duplicates += 1  # an id the soak never sent: counted as a spurious outcome
            return False
        if self.outcome[seq]:
            self.duplicates += 1
            return False
        self.outcome[seq] = kind
        self.finished[seq] = now
        return True

    def replied(self, seq: int, text: str, now: int) -> None:
        if self._final(seq, 1, now):
            self.latency[seq] = now - self.scheduled[seq]
            if text.partition(" ")[0] != str(seq):
                self.mismatched += 1

    def reported(self, seq: int | None, error: str, now: int) -> None:
        if seq is None:
            self.errors_without_id[error] += 1
        elif self._final(seq, 2, now):
            self.errors[error] += 1
            self.code[seq] = error


def slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) samples, per second."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    return sum((t - mean_t) * (v - mean_v) for t, v in samples) / var if var else 0.0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


async def run_soak(
    procs: Processes,
    minutes: float,
    rate: float,
    clients: int,
    reconnect_percent: float,
    warmup: float,
    *,
    queue: bool = True,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    log=print,
) -> dict:
    tokens = _Tokens()
    # The soak's clients all come from 127.0.0.1, which is exempt from per-address limits by default.
    deployment = await _deploy("redis", procs, tokens, "soak")
    a, b, redis_server = deployment.server_pids
    gen = LoadGenerator(deployment.controller_url, deployment.client_url, tokens.controller, tokens.client)
    duration = minutes * 60
    total = int(rate * duration)
    soak = _Soak(total)
    ids = _ids(clients, "soak")
    dropped_at: dict[str, list[float]] = {cid: [] for cid in ids}
    samples: dict[str, list[tuple[float, float]]] = {}
    redis_by_prefix: dict[str, dict[str, int]] = {}
    try:
        connected = await gen.connect_clients(ids)
        log(f"  {connected}/{clients} clients on instance B")
        controller = await gen._connect(
            f"{deployment.controller_url}/ws/soak-llm",
            {"X-Auth-Token": tokens.controller},
            lambda: _SoakController(soak),
        )
        if controller is None:
            raise RuntimeError("the controller could not connect")
        await asyncio.sleep(1)
        rng = random.Random(7)
        reconnects = 0
        pending: set[asyncio.Task] = set()

        async def reconnect(cid: str) -> None:
            client = gen.clients.pop(cid, None)
            if client is not None and client.transport is not None:
                client.transport.disconnect()
            await asyncio.sleep(rng.uniform(0.05, 0.5))  # Unity's backoff, roughly.
            await gen.connect_clients([cid])

        def sample(elapsed: float) -> None:
            for name, proc in (("a", a), ("b", b), ("redis", redis_server)):
                samples.setdefault(f"{name}_rss_mib", []).append((elapsed, proc.rss_kib() / 1024))
                samples.setdefault(f"{name}_fds", []).append((elapsed, _fds(proc.pid)))
            # What Redis holds, not what its allocator kept: tells data growth from fragmentation.
            used, keys = _redis_data(deployment.redis_port)
            samples.setdefault("redis_used_mib", []).append((elapsed, used / 2**20))
            samples.setdefault("redis_keys", []).append((elapsed, keys))

        log(f"  {rate:g} commands/s for {minutes:g} min, {reconnect_percent:g} % of clients reconnecting per second")
        fields = f',"timeout_ms":{timeout_ms}' + (',"queue":true' if queue else "")
        start_ns = _now() + 50_000_000
        interval = 1e9 / rate
        next_seq, next_churn, next_sample = 0, 1.0, 0.0
        per_second = max(1, round(clients * reconnect_percent / 100)) if reconnect_percent > 0 else 0
        while next_seq < total:
            now_ns = _now()
            elapsed = (now_ns - start_ns) / 1e9
            while next_seq < total and start_ns + next_seq * interval <= now_ns:
                seq = next_seq
                target = seq % clients
                soak.scheduled[seq] = int(start_ns + seq * interval)
                soak.target[seq] = target
                if controller.transport is not None:
                    controller.transport.send(
                        WSMsgType.TEXT,
                        f'{{"target":"{ids[target]}","message":"{seq} x","id":{seq}{fields}}}'.encode(),
                    )
                next_seq += 1
            if elapsed >= next_churn:
                next_churn += 1.0
                for cid in rng.sample(ids, per_second):
                    dropped_at[cid].append(elapsed)
                    task = asyncio.ensure_future(reconnect(cid))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    reconnects += 1
            if elapsed >= next_sample:
                next_sample += SAMPLE_SECONDS
                sample(elapsed)
            await asyncio.sleep(0.001)
        # Every command has a final outcome by its timeout_ms (the controller instance's deadline):
        # wait for all of them, or that long plus a margin, before counting one as lost.
        for _ in range(int((timeout_ms / 1000 + OUTCOME_MARGIN_S) / 0.2)):
            if 0 not in soak.outcome:
                break
            await asyncio.sleep(0.2)
        waited_s = (_now() - start_ns) / 1e9 - duration
        if pending:
            await asyncio.wait(pending, timeout=15)
        sample((_now() - start_ns) / 1e9)  # At its real time: the wait for outcomes may have taken a while.
        redis_by_prefix = _redis_by_prefix(deployment.redis_port)
    finally:
        await gen.close()
        procs.stop_all()

    lost = [seq for seq in range(total) if not soak.outcome[seq]]

    def churned(seq: int) -> bool:
        t = (soak.scheduled[seq] - start_ns) / 1e9
        return any(abs(t - d) <= CHURN_MARGIN_S for d in dropped_at[ids[soak.target[seq]]])

    lost_churned = sum(1 for seq in lost if churned(seq))

    def lost_detail(seq: int) -> dict:
        t = (soak.scheduled[seq] - start_ns) / 1e9
        drops = [round(d - t, 3) for d in dropped_at[ids[soak.target[seq]]] if abs(d - t) <= 10]
        return {
            "id": seq,
            "sent_s": round(t, 3),
            "target": ids[soak.target[seq]],
            "delivered": bool(soak.delivered[seq]),
            "queued": bool(soak.queued[seq]),
            "target_dropped_at_relative_s": drops,
        }

    window = min(60.0, duration / 3)

    def window_latency(first: bool, direct: bool = False) -> dict:
        """Replies in the first (after warm-up) or last window; ``direct``: those not queued first."""
        lo, hi = (0, int(window * rate)) if first else (total - int(window * rate), total)
        lo = max(lo, int(warmup * rate)) if first else lo
        return latency_summary(
            [soak.latency[s] for s in range(lo, hi) if soak.outcome[s] == 1 and not (direct and soak.queued[s])]
        )

    after_warmup = {key: [(t, v) for t, v in points if t >= warmup] for key, points in samples.items()}
    return {
        "minutes": minutes,
        "rate": rate,
        "clients": clients,
        "reconnects": reconnects,
        "sent": total,
        "queue": queue,
        "timeout_ms": timeout_ms,
        "waited_after_last_s": round(waited_s, 1),
        "answered": soak.outcome.count(1),
        "reported": soak.outcome.count(2),
        "errors": dict(sorted(soak.errors.items())),
        "errors_without_id": dict(soak.errors_without_id),
        "queued_then_delivered": sum(1 for q, d in zip(soak.queued, soak.delivered, strict=True) if q and d),
        # Timeouts of commands handed to their client's socket: the client left before replying.
        "timeouts_after_delivered": sum(
            1 for seq, code in soak.code.items() if code == "timeout" and soak.delivered[seq]
        ),
        "last_outcome_after_end_s": round((max(soak.finished) - start_ns) / 1e9 - duration, 1) if total else 0.0,
        "lost": len(lost),
        "lost_churned": lost_churned,
        "lost_other": len(lost) - lost_churned,
        "lost_examples": [lost_detail(seq) for seq in lost[:20]],
        "duplicates": soak.duplicates,
        "mismatched_replies": soak.mismatched,
        "controller_dropped": soak.controller_closed,
        "first_window": window_latency(True),
        "last_window": window_latency(False),
        # Queued commands wait for their client's reconnect (up to 0.5 s): these are the others.
        "first_window_direct": window_latency(True, direct=True),
        "last_window_direct": window_latency(False, direct=True),
        "window_seconds": window,
        "slopes_per_minute": {key: 60 * slope(points) for key, points in after_warmup.items()},
        "start_end": {key: (points[0][1], points[-1][1]) for key, points in samples.items() if points},
        "samples": samples,
        "redis_by_prefix": redis_by_prefix,
        "server_closes": dict(gen.server_closes),
        "connect_failures": dict(gen.connect_failures),
    }


def _redis_data(port: int | None) -> tuple[int, int]:
    """(``used_memory`` in bytes, number of keys) of the soak's Redis."""
    client = redis.Redis(port=port or 6379, socket_timeout=2)
    try:
        return int(client.info("memory")["used_memory"]), int(client.dbsize())
    finally:
        client.close()


def _redis_by_prefix(port: int | None) -> dict[str, dict[str, int]]:
    """Keys and bytes (``MEMORY USAGE``) by key prefix up to the second ``:``, at the end of the soak."""
    client = redis.Redis(port=port or 6379, socket_timeout=5)
    found: dict[str, dict[str, int]] = {}
    try:
        for key in client.scan_iter(count=1000):
            name = key.decode(errors="replace")
            prefix = ":".join(name.split(":")[:2])
            entry = found.setdefault(prefix, {"keys": 0, "bytes": 0})
            entry["keys"] += 1
            entry["bytes"] += int(client.memory_usage(key) or 0)
    finally:
        client.close()
    return dict(sorted(found.items(), key=lambda item: -item[1]["bytes"]))


def report(result: dict) -> str:
    mode = f"queue {'on' if result['queue'] else 'off'}, timeout_ms {result['timeout_ms']}"
    lines = [
        f"soak: {result['minutes']:g} min, {result['rate']:g} commands/s, {result['clients']} clients, "
        f"{result['reconnects']} reconnects ({mode})",
        f"commands: {result['sent']} sent, {result['answered']} answered, {result['reported']} reported "
        f"{result['errors']} ({result['queued_then_delivered']} queued while their client reconnected, then "
        f"delivered); waited {result['waited_after_last_s']:g} s after the last for outcomes",
        f"lost (no outcome at all): {result['lost']} ({result['lost_churned']} around a reconnect of their client); "
        f"duplicated: {result['duplicates']}; replies matched to another command's echo: "
        f"{result['mismatched_replies']}",
        "",
        f"| window ({result['window_seconds']:.0f} s) | replies | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, label in (
        ("first_window", "first"),
        ("last_window", "last"),
        ("first_window_direct", "first, not queued"),
        ("last_window_direct", "last, not queued"),
    ):
        w = result[name]
        lines.append(f"| {label} | {w['count']} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} | {w['max_ms']:.1f} |")
    lines.append(
        f"timeouts of delivered commands (their client left before replying): {result['timeouts_after_delivered']}; "
        f"last outcome {result['last_outcome_after_end_s']:g} s after the last command was sent"
    )
    lines += ["", "| process | start → end | slope after warm-up, per minute |", "|---|---|---|"]
    for key, per_minute in sorted(result["slopes_per_minute"].items()):
        first, last = result["start_end"][key]
        lines.append(f"| {key} | {first:.1f} → {last:.1f} | {per_minute:+.2f} |")
    if result.get("redis_by_prefix"):
        lines += ["", "| Redis keys at the end, by prefix | keys | bytes |", "|---|---|---|"]
        for prefix, entry in result["redis_by_prefix"].items():
            lines.append(f"| `{prefix}` | {entry['keys']} | {entry['bytes']} |")
    for example in result["lost_examples"]:
        lines.append(f"lost: {example}")
    if result["errors_without_id"]:
        lines.append(f"error frames without an id: {result['errors_without_id']}")
    if result["server_closes"] or result["connect_failures"]:
        lines.append(f"server closes: {result['server_closes']}, connect failures: {result['connect_failures']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-minutes", type=float, default=10.0, help="length of the soak (default 10)")
    parser.add_argument("--rate", type=float, default=1000.0, help="commands per second (default 1000)")
    parser.add_argument("--clients", type=int, default=1000, help="echoing clients (default 1000)")
    parser.add_argument(
        "--reconnect-percent", type=float, default=5.0, help="clients dropped and reconnected per second (default 5)"
    )
    parser.add_argument(
        "--no-queue",
        dest="queue",
        action="store_false",
        help='send without "queue": true (a command for a reconnecting client gets target_offline)',
    )
    parser.add_argument(
        "--timeout-ms", type=int, default=DEFAULT_TIMEOUT_MS, help=f"each command's timeout_ms ({DEFAULT_TIMEOUT_MS})"
    )
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds left out of the slopes (default 10)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures to this JSON file")
    parser.add_argument("--wsbridge", type=Path, default=None, help="the wsbridge script to run (default: this one)")
    args = parser.parse_args(argv)
    if raise_nofile_limit() < args.clients * 2 + 100:
        print("warning: the open-files limit is low for this many clients", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="wsbridge-soak-") as tmp, Processes(Path(tmp), args.wsbridge) as procs:
        result = asyncio.run(
            run_soak(
                procs,
                args.soak_minutes,
                args.rate,
                args.clients,
                args.reconnect_percent,
                args.warmup,
                queue=args.queue,
                timeout_ms=args.timeout_ms,
            )
        )
    print()
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if result["lost"] or result["duplicates"] or result["controller_dropped"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
