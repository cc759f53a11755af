"""New client ids per address and per token against real appliances (issue #20 item 4; docs/protocol.md 4015).

Without the limit, one host holding the shared client token cycles fresh ids without end and
pushes every real device's connect history out. Peers are told apart by ``X-Forwarded-For``,
trusted from 127.0.0.1 (loopback itself is exempt from per-address limits and not counted).
"""

from __future__ import annotations

import re

from support import CLIENT_TOKEN, closed_with, eventually, http_aget, timeout
from websockets.asyncio.client import connect

REFUSED = (4015, "too many new client ids from this address or with this token; try later")


def dial(app, client_id: str, address: str):
    headers = {"X-Auth-Token": CLIENT_TOKEN, "X-Forwarded-For": address}
    return connect(f"{app.ws}/ws/{client_id}", additional_headers=headers, open_timeout=timeout(10))


async def refused_total(app, reason: str) -> float:
    text = (await http_aget(app.http + "/metrics"))[1]
    found = re.search(rf'^wsbridge_admission_refused_total{{reason="{reason}"}} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def admitted(app, client_id: str, address: str) -> bool:
    """Open ``client_id`` from ``address`` and close it again; False if the relay refused it."""
    async with dial(app, client_id, address) as ws:
        await ws.send("hello")
        await ws.ping()
        return ws.protocol.close_rcvd is None


async def test_one_address_gets_a_few_new_ids_then_4015_while_known_ids_and_other_addresses_connect(start_appliance):
    app = start_appliance({"NEW_IDS_PER_ADDRESS": "3", "NEW_IDS_PER_TOKEN": "0"})
    flood, other = "203.0.113.60", "203.0.113.61"
    assert [await admitted(app, f"fresh-{n}", flood) for n in range(3)] == [True, True, True]
    async with dial(app, "fresh-3", flood) as ws:
        assert await closed_with(ws) == REFUSED
    assert await eventually(lambda: admitted(app, "fresh-0", flood), 10, "a known id reconnecting")
    assert await admitted(app, "fresh-4", other)
    assert await refused_total(app, "new_ids_address") == 1


async def test_the_token_limit_holds_across_instances_on_redis(start_appliance, redis_server):
    env = {"NEW_IDS_PER_TOKEN": "4", "NEW_IDS_PER_ADDRESS": "0"}
    a = start_appliance(env, redis_url=redis_server.url, name="new-ids-a")
    b = start_appliance(env, redis_url=redis_server.url, name="new-ids-b")
    seen = [await admitted(a if n % 2 else b, f"fleet-{n}", f"198.51.100.{n + 1}") for n in range(4)]
    assert seen == [True] * 4  # Four addresses, four instances' worth of ids: one count on Redis.
    for app, client_id in ((a, "fleet-4"), (b, "fleet-5")):
        async with dial(app, client_id, "198.51.100.50") as ws:
            assert await closed_with(ws) == REFUSED
