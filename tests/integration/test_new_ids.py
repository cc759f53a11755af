"""Who may connect, cluster-wide, against two real appliances on a real Redis: new ids per address (4015,
issue #20 item 4) and the ban list over the HTTP API (4016, issue #24 item 16).

Without the new-id limit, one host holding the shared client token cycles fresh ids without end
and pushes every real device's connect history out. Without bans, a disconnected client comes
straight back. Peers are told apart by ``X-Forwarded-For``, trusted from 127.0.0.1 (loopback
itself is exempt from per-address limits and not counted). The two instances and their Redis
(their own: counters and bans must not meet other tests') serve the whole module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from support import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    CONTROLLER_TOKEN,
    Appliance,
    RedisServer,
    closed_with,
    http_aget,
    timeout,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

REFUSED = (4015, "too many new client ids from this address or with this token; try later")
BANNED = (4016, "this client id or address is banned")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Appliance, Appliance]]:
    redis = RedisServer()
    redis.start()
    env = {"NEW_IDS_PER_ADDRESS": "3", "NEW_IDS_PER_TOKEN": "0", "MAX_FAILED_HANDSHAKES_PER_MINUTE": "2"}
    a = Appliance(env, redis_url=redis.url, name="gate-a").start()
    b = Appliance(env, redis_url=redis.url, name="gate-b").start()
    yield a, b
    a.stop()
    b.stop()
    redis.stop()


def dial(app, client_id: str, address: str | None = None):
    headers = {"X-Auth-Token": CLIENT_TOKEN} | ({"X-Forwarded-For": address} if address else {})
    return connect(f"{app.ws}/ws/{client_id}", additional_headers=headers, open_timeout=timeout(10))


async def refused_total(app, reason: str) -> float:
    text = (await http_aget(app.http + "/metrics"))[1]
    found = re.search(rf'^wsbridge_admission_refused_total{{reason="{reason}"}} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def admitted(app, client_id: str, address: str | None = None) -> bool:
    """Open ``client_id`` from ``address`` and close it again; False if the relay refused it."""
    async with dial(app, client_id, address) as ws:
        await ws.send("hello")
        await ws.ping()
        return ws.protocol.close_rcvd is None


async def test_one_address_gets_a_few_new_ids_across_instances_then_4015_known_ids_still_connect(pair):
    a, b = pair
    flood, other = "203.0.113.60", "203.0.113.61"
    assert [await admitted(a if n % 2 else b, f"fresh-{n}", flood) for n in range(2)] == [True] * 2
    async with dial(b, "fresh-2", flood) as held:
        await held.ping()
        for app in (a, b):  # One count on Redis: refused on either instance.
            async with dial(app, "fresh-3", flood) as ws:
                assert await closed_with(ws) == REFUSED
        assert await admitted(a, "fresh-2", flood)  # Known (held on the other instance): not counted, not refused.
    assert await admitted(b, "fresh-4", other)
    assert await refused_total(a, "new_ids_address") == 1


async def test_a_ban_on_one_instance_closes_and_refuses_on_the_other_until_lifted(pair):
    a, b = pair
    admin = {"X-Auth-Token": ADMIN_TOKEN}
    async with httpx.AsyncClient(timeout=timeout(10)) as http, dial(b, "kiosk-7") as held:
        for token in (CONTROLLER_TOKEN, CLIENT_TOKEN):
            sent = {"target": "kiosk-7", "seconds": 3600}
            answer = await http.post(a.http + "/api/v1/bans", json=sent, headers={"X-Auth-Token": token})
            assert answer.status_code == 403
        answer = await http.post(a.http + "/api/v1/bans", json={"target": "kiosk 7", "seconds": 3600}, headers=admin)
        assert answer.status_code == 422 and answer.json()["error"] == "invalid_ban"
        answer = await http.post(
            a.http + "/api/v1/bans", json={"target": "kiosk-7", "seconds": 3600, "reason": "stolen"}, headers=admin
        )
        assert answer.status_code == 201 and answer.json()["closed"] == 1
        assert await closed_with(held) == BANNED  # Held on the other instance: closed there.
        async with dial(b, "kiosk-7") as again:
            assert await closed_with(again) == BANNED
        async with dial(a, "kiosk-9", "198.51.100.10") as in_block:  # Held on the other instance, in the block.
            await in_block.ping()
            block = {"target": "198.51.100.0/24", "seconds": 600}
            answer = await http.post(b.http + "/api/v1/bans", json=block, headers=admin)
            assert answer.status_code == 201  # Closed at once if presence shows it, else by its instance's watch:
            assert await closed_with(in_block, 10) == BANNED
        for _ in range(3):  # A banned peer that keeps trying is cooled down like a scanner...
            async with dial(a, "kiosk-8", "198.51.100.9") as ws:
                assert await closed_with(ws) == BANNED
        with pytest.raises(InvalidStatus) as refused:  # ...refused before the upgrade, at no cost.
            async with dial(a, "kiosk-8", "198.51.100.9"):
                pass
        assert refused.value.response.status_code == 429
        listed = (await http.get(b.http + "/api/v1/bans", headers=admin)).json()["bans"]
        assert {ban["key"] for ban in listed} == {"id:kiosk-7", "address:198.51.100.0/24"}
        for target in ("kiosk-7", "198.51.100.0/24"):
            lifted = await http.delete(b.http + "/api/v1/bans", params={"target": target}, headers=admin)
            assert lifted.status_code == 204
        assert (
            await http.delete(a.http + "/api/v1/bans", params={"target": "kiosk-7"}, headers=admin)
        ).status_code == 404
    assert await admitted(a, "kiosk-7")
    assert await admitted(b, "kiosk-8", "198.51.100.9")
    assert await refused_total(a, "banned") + await refused_total(b, "banned") == 4  # kiosk-7 once, kiosk-8 three times
