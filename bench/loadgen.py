"""Load generator speaking the wire contract, on picows so that it is not the bottleneck.

- *Clients* connect to ``ws://host/ws/{id}`` with the client token and answer
  every command with the same text (echo), as a Unity client would.
- *Controllers* connect with the controller token, send
  ``{"target": id, "message": text}`` and receive ``{"sender": id, "message": text}``.

The command text is ``"<seq> <t_ns>"``: a sequence number and a timestamp from
``time.perf_counter_ns()`` (the schedule time in the open loop), so a reply
alone says which command it answers and how long it took. Clients and
controllers live in this one process and share the clock.

Everything is bounded: every wait has a deadline, every loop a count or a
duration, and :meth:`LoadGenerator.close` drops every connection.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

__all__ = ["LoadGenerator", "percentile", "latency_summary"]

_now = time.perf_counter_ns


class _Incoming(msgspec.Struct):
    """A frame a controller receives: a reply or an error frame."""

    sender: str | None = None
    message: str | None = None
    error: str | None = None


_decode_incoming = msgspec.json.Decoder(_Incoming).decode


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[rank])


def latency_summary(latencies_ns: list[int]) -> dict[str, float]:
    """p50/p99/p99.9/max in milliseconds."""
    values = sorted(latencies_ns)
    ms = 1e6
    return {
        "count": len(values),
        "p50_ms": percentile(values, 50) / ms,
        "p99_ms": percentile(values, 99) / ms,
        "p999_ms": percentile(values, 99.9) / ms,
        "max_ms": (values[-1] / ms) if values else float("nan"),
    }


class _EchoClient(WSListener):
    """A client: echoes every text frame, counts what it got for fan-out timing."""

    __slots__ = ("gen", "client_id", "transport", "received", "closed_with")

    def __init__(self, gen: LoadGenerator, client_id: str) -> None:
        self.gen = gen
        self.client_id = client_id
        self.transport: WSTransport | None = None
        self.received = 0
        self.closed_with: int | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            self.received += 1
            gen = self.gen
            gen.commands_received += 1
            if gen.fanout_expected:
                gen.fanout_got += 1
                if gen.fanout_got == gen.fanout_expected:
                    gen.fanout_last_ns = _now()
            if gen.echo:
                transport.send(WSMsgType.TEXT, payload)
        elif msg_type is WSMsgType.CLOSE:
            self.closed_with = frame.get_close_code().value if frame.payload_size >= 2 else 1005
            self.gen.server_closes[self.closed_with] += 1
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        self.gen.disconnected += 1


class _Controller(WSListener):
    """A controller: hands every reply to the scenario's callback."""

    __slots__ = ("gen", "name", "transport", "on_reply")

    def __init__(self, gen: LoadGenerator, name: str) -> None:
        self.gen = gen
        self.name = name
        self.transport: WSTransport | None = None
        self.on_reply = _ignore_reply

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def send_command(self, target: str, text: str) -> None:
        # The text is digits and spaces only, so no JSON escaping is needed.
        self.transport.send(WSMsgType.TEXT, f'{{"target":"{target}","message":"{text}"}}'.encode())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT:
            now = _now()
            incoming = _decode_incoming(frame.get_payload_as_bytes())
            if incoming.error is not None:
                self.gen.errors[incoming.error] += 1
            elif incoming.sender is not None and incoming.message is not None:
                self.on_reply(incoming.sender, incoming.message, now)
            else:
                self.gen.errors["unexpected_frame"] += 1
        elif msg_type is WSMsgType.CLOSE:
            code = frame.get_close_code().value if frame.payload_size >= 2 else 1005
            self.gen.server_closes[code] += 1
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        self.gen.disconnected += 1


_SPIN_S = 50e-6


def _tight_timer_slack() -> None:
    """Ask Linux for 1 ns timer slack in this thread (default 50 us), best effort."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK = 29, prctl(2)
    except (OSError, AttributeError):
        pass


def _ignore_reply(sender: str, text: str, now: int) -> None:
    pass


@dataclass
class _Window:
    """Counts and latencies of one measurement window."""

    latencies: list[int] = field(default_factory=list)
    service: list[int] = field(default_factory=list)


class LoadGenerator:
    """Connections and scenarios against one deployment of the relay.

    ``controller_url`` and ``client_url`` are base URLs (``ws://127.0.0.1:P``);
    they differ in the two-instance Redis setup (controller on A, clients on B).
    """

    def __init__(
        self,
        controller_url: str,
        client_url: str,
        controller_token: str,
        client_token: str,
        connect_concurrency: int = 200,
    ) -> None:
        self.controller_url = controller_url.rstrip("/")
        self.client_url = client_url.rstrip("/")
        self._controller_headers = {"X-Auth-Token": controller_token}
        self._client_headers = {"X-Auth-Token": client_token}
        self._connect_slots = asyncio.Semaphore(connect_concurrency)
        self.clients: dict[str, _EchoClient] = {}
        self.controllers: list[_Controller] = []
        self.echo = True
        self.commands_received = 0
        self.fanout_expected = 0
        self.fanout_got = 0
        self.fanout_last_ns = 0
        self.disconnected = 0
        self.connect_failures: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.server_closes: Counter[int] = Counter()

    # ---------------------------------------------------------------- connections

    async def _connect(self, url: str, headers: dict[str, str], factory, attempts: int = 3):
        async with self._connect_slots:
            for attempt in range(attempts):
                try:
                    _transport, listener = await ws_connect(
                        factory,
                        url,
                        extra_headers=headers,
                        websocket_handshake_timeout=15,
                        # Idle clients are most of the connections: a small read
                        # buffer keeps 10,000 of them cheap in the generator.
                        read_buffer_init_size=1024,
                        enable_auto_pong=True,
                        use_aiofastnet=False,
                    )
                    return listener
                except Exception as exc:  # refused, reset, handshake timeout: retried, then counted
                    if attempt == attempts - 1:
                        self.connect_failures[type(exc).__name__] += 1
                        return None
                    await asyncio.sleep(0.05 * (attempt + 1))
        return None

    async def connect_controllers(self, count: int = 1, prefix: str = "bench-ctl") -> None:
        for index in range(len(self.controllers), len(self.controllers) + count):
            name = f"{prefix}{index}"
            listener = await self._connect(
                f"{self.controller_url}/ws/{name}", self._controller_headers, lambda n=name: _Controller(self, n)
            )
            if listener is None:
                raise RuntimeError(f"controller {name} could not connect: {dict(self.connect_failures)}")
            self.controllers.append(listener)

    async def connect_clients(self, ids: list[str]) -> int:
        """Connect the clients with these ids (skipping connected ones); returns how many are connected."""
        todo = [cid for cid in ids if cid not in self.clients]

        async def one(cid: str) -> None:
            listener = await self._connect(
                f"{self.client_url}/ws/{cid}", self._client_headers, lambda: _EchoClient(self, cid)
            )
            if listener is not None:
                self.clients[cid] = listener

        await asyncio.gather(*(one(cid) for cid in todo))
        return sum(1 for cid in ids if cid in self.clients and self.clients[cid].transport is not None)

    def open_clients(self) -> int:
        return sum(1 for client in self.clients.values() if client.transport is not None)

    async def close(self) -> None:
        for listener in [*self.controllers, *self.clients.values()]:
            if listener.transport is not None:
                listener.transport.disconnect(graceful=False)
        await asyncio.sleep(0)

    # ---------------------------------------------------------------- scenarios

    async def probe(self, ids: list[str], timeout: float = 20.0) -> list[str]:
        """Send one command to each client until each has echoed it; returns the ids that never did.

        A client that just connected may not be routable yet (on Redis its
        channel subscription is still on its way), so the probe retries the
        silent ones every half second until the deadline.
        """
        controller = self.controllers[0]
        waiting = set(ids)

        def on_reply(sender: str, text: str, now: int) -> None:
            waiting.discard(sender)

        controller.on_reply = on_reply
        deadline = time.monotonic() + timeout
        try:
            while waiting and time.monotonic() < deadline:
                for cid in list(waiting):
                    controller.send_command(cid, f"0 {_now()}")
                resend_at = time.monotonic() + 0.5
                while waiting and time.monotonic() < min(resend_at, deadline):  # noqa: ASYNC110 (polls a counter)
                    await asyncio.sleep(0.01)
            # Late echoes of the repeated probes must not leak into the next scenario.
            await asyncio.sleep(0.2)
        finally:
            controller.on_reply = _ignore_reply
        self.errors.clear()
        return sorted(waiting)

    async def closed_loop(
        self, ids: list[str], outstanding: int, duration: float, warmup: float, server_cpu=None
    ) -> dict:
        """Keep ``outstanding`` commands in flight (each reply triggers the next command to that client).

        Returns round trips per second over the measurement window, their
        latency, and how many commands were never answered after a drain.
        ``server_cpu``, a function returning the server's CPU seconds so far,
        gives the server's CPU time per round trip over the same window: a
        figure that a busy machine disturbs far less than the throughput.
        """
        server_cpu = server_cpu or (lambda: float("nan"))
        controllers = self.controllers
        owner = {cid: controllers[i % len(controllers)] for i, cid in enumerate(ids)}
        pending: set[int] = set()
        window = _Window()
        state = {"seq": 0, "measuring": False, "running": True, "done": 0, "sent": 0, "stray": 0}

        def send(cid: str) -> None:
            state["seq"] = seq = state["seq"] + 1
            pending.add(seq)
            state["sent"] += 1
            owner[cid].send_command(cid, f"{seq} {_now()}")

        def make_handler(me: _Controller):
            latencies = window.latencies

            def on_reply(sender: str, text: str, now: int) -> None:
                if owner.get(sender) is not me:
                    return  # every controller gets every reply; only the sender's owner counts it
                seq_text, _, sent_text = text.partition(" ")
                seq = int(seq_text)
                if seq not in pending:
                    state["stray"] += 1
                    return
                pending.remove(seq)
                if state["measuring"]:
                    latencies.append(now - int(sent_text))
                    state["done"] += 1
                if state["running"]:
                    send(sender)

            return on_reply

        for controller in controllers:
            controller.on_reply = make_handler(controller)
        errors_before = sum(self.errors.values())
        cpu = _CpuWindow()
        try:
            for i in range(outstanding):
                send(ids[i % len(ids)])
            await asyncio.sleep(warmup)
            state["measuring"] = True
            cpu.start()
            server_before = server_cpu()
            started = _now()
            await asyncio.sleep(duration)
            state["measuring"] = False
            elapsed = (_now() - started) / 1e9
            cpu.stop()
            server_used = server_cpu() - server_before
            state["running"] = False
            await _wait_for(lambda: not pending, 10.0)
        finally:
            for controller in controllers:
                controller.on_reply = _ignore_reply
        return {
            "round_trips_per_s": state["done"] / elapsed,
            "round_trips": state["done"],
            "sent": state["sent"],
            "unanswered": len(pending),
            "stray_replies": state["stray"],
            "errors": sum(self.errors.values()) - errors_before,
            "latency": latency_summary(window.latencies),
            "generator_cpu_pct": cpu.percent,
            "server_cpu_us_per_round_trip": 1e6 * server_used / max(state["done"], 1),
            "generator_cpu_us_per_round_trip": 1e6 * cpu.seconds / max(state["done"], 1),
            "window_s": elapsed,
        }

    async def open_loop(self, ids: list[str], rate: float, duration: float, warmup: float) -> dict:
        """Send at a fixed ``rate`` on a fixed schedule, whatever the replies do.

        Latency is measured from each command's *scheduled* send time, so a
        stall (in the relay or here) is charged to every command it delays
        instead of hiding it (no coordinated omission). A timer thread sleeps
        to each scheduled time and wakes the event loop, because the event
        loop's own timers have 1 ms granularity, as large as the target.
        ``service`` is the latency from the actual send, for comparison.
        """
        controller = self.controllers[0]
        interval_ns = 1e9 / rate
        total = round(rate * (warmup + duration))
        first_measured = round(rate * warmup)
        loop = asyncio.get_running_loop()
        begin = _now() + 50_000_000  # 50 ms to get the timer thread going
        schedule = [int(begin + i * interval_ns) for i in range(total)]
        sent_at = [0] * total
        answered = bytearray(total)
        window = _Window()
        state = {"next": 0, "answered": 0}
        n_ids = len(ids)

        def send_due() -> None:
            now = _now()
            i = state["next"]
            while i < total and schedule[i] <= now:
                sent_at[i] = now
                controller.send_command(ids[i % n_ids], f"{i} {schedule[i]}")
                i += 1
            state["next"] = i

        def on_reply(sender: str, text: str, now: int) -> None:
            seq_text, _, sched_text = text.partition(" ")
            seq = int(seq_text)
            if seq >= total or answered[seq]:
                return
            answered[seq] = 1
            state["answered"] += 1
            if seq >= first_measured:
                window.latencies.append(now - int(sched_text))
                window.service.append(now - sent_at[seq])

        stop = threading.Event()

        def ticker() -> None:
            _tight_timer_slack()
            for due in schedule:
                # Sleep to just before the due time, then spin the last stretch:
                # a sleep alone wakes 50-100 us late (timer slack, scheduler).
                delay = (due - _now()) / 1e9 - _SPIN_S
                if delay > 0 and stop.wait(delay):
                    return
                while _now() < due:
                    pass
                loop.call_soon_threadsafe(send_due)
                if stop.is_set() or state["next"] >= total:
                    return

        controller.on_reply = on_reply
        errors_before = sum(self.errors.values())
        cpu = _CpuWindow()
        thread = threading.Thread(target=ticker, name="open-loop-ticker", daemon=True)
        try:
            cpu.start()
            thread.start()
            await _wait_for(lambda: state["next"] >= total, warmup + duration + 10.0)
            cpu.stop()
            await _wait_for(lambda: state["answered"] >= total, 10.0)
        finally:
            stop.set()
            thread.join(timeout=5)
            controller.on_reply = _ignore_reply
        lag = sorted(sent_at[i] - schedule[i] for i in range(first_measured, total) if sent_at[i])
        return {
            "rate": rate,
            "sent": state["next"],
            "unanswered": total - state["answered"],
            "errors": sum(self.errors.values()) - errors_before,
            "latency": latency_summary(window.latencies),
            "service": latency_summary(window.service),
            "send_lag_p99_ms": percentile(lag, 99) / 1e6,
            "generator_cpu_pct": cpu.percent,
        }

    async def fan_out(self, ids: list[str], repeats: int, pause: float = 0.2, server_cpu=None) -> dict:
        """Send one command to each of ``ids`` back to back, ``repeats`` times.

        ``delivered`` is the time from the first send until the last client
        has received its command; ``replied`` until the controller has every
        echo back (the clients echo, as real ones answer).
        """
        controller = self.controllers[0]
        delivered: list[float] = []
        replied: list[float] = []
        incomplete = 0
        state = {"replies": 0, "last": 0}
        expected = len(ids)

        def on_reply(sender: str, text: str, now: int) -> None:
            state["replies"] += 1
            if state["replies"] == expected:
                state["last"] = now

        controller.on_reply = on_reply
        errors_before = sum(self.errors.values())
        server_cpu = server_cpu or (lambda: float("nan"))
        cpu_per_rep: list[float] = []
        try:
            for rep in range(repeats):
                cpu_before = server_cpu()
                self.fanout_got = 0
                self.fanout_last_ns = 0
                self.fanout_expected = len(ids)
                state["replies"] = 0
                state["last"] = 0
                started = _now()
                text = f"{rep} {started}"
                for cid in ids:
                    controller.send_command(cid, text)
                ok = await _wait_for(lambda: state["replies"] >= expected, 10.0, poll=0.001)
                finished = state["last"]
                if not ok or self.fanout_got < len(ids):
                    incomplete += 1
                else:
                    delivered.append((self.fanout_last_ns - started) / 1e6)
                    replied.append((finished - started) / 1e6)
                    cpu_per_rep.append(1e3 * (server_cpu() - cpu_before))
                self.fanout_expected = 0
                await asyncio.sleep(pause)
        finally:
            self.fanout_expected = 0
            controller.on_reply = _ignore_reply
        return {
            "clients": len(ids),
            "repeats": repeats,
            "incomplete": incomplete,
            "errors": sum(self.errors.values()) - errors_before,
            "delivered_median_ms": statistics.median(delivered) if delivered else float("nan"),
            "delivered_max_ms": max(delivered) if delivered else float("nan"),
            "replied_median_ms": statistics.median(replied) if replied else float("nan"),
            "delivered_ms": delivered,
            "replied_ms": replied,
            # Server CPU for one fan-out and its 1000 echoes (read after the echoes are back).
            "server_cpu_ms": cpu_per_rep,
        }


class _CpuWindow:
    """CPU used by this (generator) process over a window, in % of one core."""

    def __init__(self) -> None:
        self.percent = float("nan")
        self.seconds = float("nan")
        self._cpu = 0.0
        self._wall = 0.0

    def start(self) -> None:
        self._cpu = time.process_time()
        self._wall = time.monotonic()

    def stop(self) -> None:
        wall = time.monotonic() - self._wall
        self.seconds = time.process_time() - self._cpu
        if wall > 0:
            self.percent = 100 * self.seconds / wall


async def _wait_for(condition, timeout: float, poll: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True
