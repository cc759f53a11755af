"""In-process cost of one command and its reply through ``Relay.perform`` (v1 and v2).

The end-to-end benchmarks swing by tens of percent on a shared machine; this one runs
the server's bookkeeping without sockets (a fake ASGI send, send queues cleared) and
reports the fastest of N rounds, which is stable enough to compare single commits:

    python -m bench.inproc --rounds 15 --n 20000

Seconds move with the machine's load; instructions do not. Under callgrind, the difference
between two sizes is the instructions per command, whatever else the machine is doing:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.inproc --rounds 1 --n 2000 --only v1
    (the same with --n 6000; Ir(6000) - Ir(2000) over 4000 commands)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from typing import Any

__all__ = ["main", "measure"]


async def measure(rounds: int, n: int, versions: tuple[bool, ...] = (False, True)) -> dict[str, float]:
    """Fastest µs per command (command frame plus reply frame) for v1 and v2."""
    os.environ.update(
        {"LLM_SECRET_TOKEN": "x" * 24, "UNITY_CLIENT_TOKEN": "y" * 24, "LOG_LEVEL": "WARNING", "CLIENT_RATE_LIMIT": "0"}
    )
    from appliance.brokers.base import Owner
    from appliance.brokers.memory import MemoryBroker
    from appliance.core.protocol import Role
    from appliance.settings import Settings

    try:  # Every v2 id is an idempotency key: unbudgeted, so that 20,000 a round are all sent (not refused).
        from appliance.core.keybudget import KeyBudget

        broker = MemoryBroker(key_budget=KeyBudget(keys=10**9, bytes=1 << 50))
    except ImportError:  # A build from before the key budget.
        broker = MemoryBroker()
    try:
        from appliance.app import wire_relay
    except ImportError:  # A build from before the composition root (compare with --extra-target-style checkouts).
        from appliance.relay import Relay

        relay = Relay(Settings(_env_file=None), broker)  # type: ignore[call-arg]
    else:
        relay = wire_relay(Settings(_env_file=None), broker).relay  # type: ignore[call-arg]
    await relay.broker.start(relay)

    async def send(event: Any) -> None:
        pass

    def connect(client_id: str, role: Role, v2: bool = False) -> Any:
        conn = relay.new_connection(client_id, role, send, "127.0.0.1", v2=v2)
        relay._register(conn, Owner(relay.instance, conn.conn_key, 1, role), None)
        return conn

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    ctl = connect("bench", Role.CONTROLLER)
    clients = {False: connect("c1", Role.CLIENT), True: connect("c2", Role.CLIENT, v2=True)}
    frames = {
        False: [('{"target":"c1","message":"ping"}', "ping")] * n,
        True: [
            (f'{{"target":"c2","message":"ping","id":{i},"timeout_ms":60000}}', f'{{"reply_to":{i},"message":"ping"}}')
            for i in range(n)
        ],
    }
    best = {False: float("inf"), True: float("inf")}
    perform = relay.perform
    for _ in range(rounds):
        for v2 in versions:
            client = clients[v2]
            start = time.perf_counter()
            for i, (command, reply) in enumerate(frames[v2]):
                now = time.time()
                perform(ctl, ctl.session.receive_text(command, now))
                perform(client, client.session.receive_text(reply, now))
                if i & 63 == 0:  # What the flusher would have written.
                    ctl._pending.clear()
                    client._pending.clear()
                    ctl._pending_chars = client._pending_chars = 0
            best[v2] = min(best[v2], (time.perf_counter() - start) / n * 1e6)
            ctl._pending.clear()
            client._pending.clear()
    return {"v1": best[False], "v2": best[True]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=20_000, help="commands per round")
    parser.add_argument("--only", choices=("v1", "v2"), help="measure one protocol version (for callgrind)")
    args = parser.parse_args(argv)
    versions = (args.only == "v2",) if args.only else (False, True)
    best = asyncio.run(measure(args.rounds, args.n, versions))
    figures = "  ".join(f"{name} {value:.2f}" for name, value in best.items() if value != float("inf"))
    print(f"µs per command (fastest of {args.rounds} rounds of {args.n}): {figures}")


if __name__ == "__main__":
    main()
