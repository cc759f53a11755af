"""Who may connect as which id: the new-id rule, its windows, the ban list's rules and the gate on the memory broker."""

from __future__ import annotations

import time

import pytest

from appliance.brokers.memory import MemoryBroker
from appliance.core.bans import Ban, BanList, parse_target
from appliance.core.newids import FixedWindows, NewIdLimits, WindowCount
from appliance.core.protocol import CloseCode, Role
from appliance.gate import Gate
from appliance.settings import Settings

A, B = "203.0.113.5", "198.51.100.7"


# --- the new-id rule --------------------------------------------------------------------------


def test_a_new_id_counts_under_its_token_and_its_address_and_the_first_over_either_limit_refuses():
    limits = NewIdLimits(per_token=3, per_address=2, window=60)
    assert limits.counters("kiosks", "2001:db8:1:2::7") == [("tok:kiosks", 3), ("addr:2001:db8:1:2::/64", 2)]
    assert limits.counters(None, None) == []
    assert NewIdLimits(per_token=0, per_address=2).counters("kiosks", A) == [(f"addr:{A}", 2)]
    assert not NewIdLimits(0, 0).enabled
    under = [("tok:k", 3, WindowCount(3, 10.0)), (f"addr:{A}", 2, WindowCount(2, 20.0))]
    assert limits.refusal(under) is None
    assert limits.refusal([("tok:k", 3, WindowCount(4, 10.0)), under[1]]) == ("token", 10.0)
    assert limits.refusal([under[0], (f"addr:{A}", 2, WindowCount(3, 20.0))]) == ("address", 20.0)


def test_fixed_windows_count_from_the_first_and_restart_when_the_window_ends():
    windows = FixedWindows()
    assert [windows.add("k", 10, now=t).count for t in (0, 1, 9.9)] == [1, 2, 3]
    assert windows.add("k", 10, now=9.9).left == pytest.approx(0.1)
    assert windows.add("k", 10, now=10) == WindowCount(1, 10)
    windows.prune(now=25)
    assert len(windows) == 0


def test_fixed_windows_stay_bounded_under_a_flood_of_fresh_keys():
    windows = FixedWindows(max_keys=100)
    for n in range(10_000):
        windows.add(f"addr:{n}", 60, now=n / 1000)
    assert len(windows) == 100
    assert windows.add("addr:9999", 60, now=10).count == 2  # The newest are kept.


# --- the ban list's rules ---------------------------------------------------------------------


def test_a_ban_target_is_an_id_an_address_or_a_block_normalised_and_nothing_else():
    assert parse_target(" kiosk-7 ") == ("id", "kiosk-7")
    assert parse_target("203.0.113.7") == ("address", "203.0.113.7/32")
    assert parse_target("203.0.113.9/24") == ("address", "203.0.113.0/24")
    assert parse_target("2001:db8::1/64") == ("address", "2001:db8::/64")
    for bad, says in [
        ("kiosk 7", "neither"),
        ("<b>x</b>", "neither"),
        ("10.0.0.0/7", "too wide"),
        ("::/16", "too wide"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_target(bad)


def ban(kind: str, target: str, until: float = 100.0, at: float = 0.0) -> Ban:
    return Ban(kind, target, until, "ADMIN_TOKEN", "", at)


def test_the_ban_list_refuses_a_banned_id_or_an_address_in_a_banned_block_until_the_ban_ends():
    bans = BanList([ban("id", "kiosk-7"), ban("address", "203.0.113.0/24", until=50), ban("address", "2001:db8::/64")])
    assert bans.blocking("kiosk-7", B, now=10).key == "id:kiosk-7"
    assert bans.blocking("kiosk-8", A, now=10).key == "address:203.0.113.0/24"
    assert bans.blocking("kiosk-8", "2001:db8::42", now=10).key == "address:2001:db8::/64"
    assert bans.blocking("kiosk-8", B, now=10) is None
    assert bans.blocking("kiosk-8", "unknown", now=10) is None
    assert bans.blocking("kiosk-8", A, now=50) is None  # Ended.
    assert bans.blocking("kiosk-7", None, now=100) is None


def test_ban_records_round_trip_and_a_broken_record_never_blocks_anyone():
    kept = Ban("address", "203.0.113.7/32", 100.0, "ADMIN_TOKEN", "scanner", 5.0)
    assert Ban.decode(kept.encode()) == kept and kept.shown_target() == "203.0.113.7"
    bans = BanList.decode([kept.encode(), "not json", '{"kind": "id"}'])
    assert len(bans) == 1 and bans.blocking("x", "203.0.113.7", now=6) == kept


# --- the gate, on the embedded broker ---------------------------------------------------------


def gate(**limits: object) -> Gate:
    settings = Settings(_env_file=None, instance_id="unit", **limits)  # type: ignore[arg-type]
    return Gate(settings, MemoryBroker())


async def test_the_gate_refuses_new_ids_over_the_token_limit_but_never_a_known_id():
    g = gate(new_ids_per_token=2, new_ids_per_address=0)
    assert [await g.admit(f"dev-{n}", Role.CLIENT, "CLIENT_TOKEN", A) for n in range(3)] == [
        None,
        None,
        CloseCode.TOO_MANY_NEW_IDS,
    ]
    g.broker.record_history("dev-0", {"code": 1000})  # Known: it has connected before.
    assert await g.admit("dev-0", Role.CLIENT, "CLIENT_TOKEN", B) is None
    assert await g.admit("dev-9", Role.CLIENT, "other-fleet", B) is None  # Another token counts apart.
    assert await g.admit("LLM-2", Role.CONTROLLER, "LLM_TOKEN", A) is None  # Controllers are not counted.


async def test_the_gate_counts_new_ids_per_address_and_not_from_exempt_addresses():
    g = gate(new_ids_per_token=0, new_ids_per_address=1)
    assert await g.admit("a-1", Role.CLIENT, "CLIENT_TOKEN", A) is None
    assert await g.admit("a-2", Role.CLIENT, "CLIENT_TOKEN", A) is CloseCode.TOO_MANY_NEW_IDS
    assert await g.admit("a-3", Role.CLIENT, "CLIENT_TOKEN", B) is None
    assert [await g.admit(f"l-{n}", Role.CLIENT, "CLIENT_TOKEN", "127.0.0.1") for n in range(5)] == [None] * 5


async def test_the_gate_refuses_a_banned_id_or_address_for_any_role_and_sees_a_lift_at_once():
    g = gate()
    now = time.time()
    await g.broker.put_ban("id:kiosk-7", ban("id", "kiosk-7", until=now + 60).encode(), now + 60)
    await g.broker.put_ban("address:203.0.113.0/24", ban("address", "203.0.113.0/24", now + 60).encode(), now + 60)
    assert await g.admit("kiosk-7", Role.CLIENT, "CLIENT_TOKEN", B) is CloseCode.BANNED
    assert await g.admit("LLM", Role.CONTROLLER, "LLM_TOKEN", A) is CloseCode.BANNED
    assert await g.broker.drop_ban("id:kiosk-7")
    assert await g.admit("kiosk-7", Role.CLIENT, "CLIENT_TOKEN", B) is None
