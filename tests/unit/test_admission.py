"""Per-address and per-token limits, origins and the log-flood limit, with the clock passed in."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.admission import OriginPolicy
from appliance.core.admission import Admission, AdmissionLimits, Refusal, address_key, parse_networks
from appliance.logflood import SUPPRESSED, LogFlood

LIMITS = AdmissionLimits(
    connections_per_address=2,
    connections_per_token=3,
    failed_handshakes_per_minute=5,
    cooldown_seconds=60,
    http_rate=2,
    http_burst=4,
    exempt=parse_networks("127.0.0.1, ::1"),
)
A, B = "203.0.113.5", "198.51.100.7"


def test_an_address_that_fails_too_many_handshakes_cools_down_and_then_may_try_again():
    admission = Admission(LIMITS, now=0)
    started = [admission.handshake_failed(A, now=1) for _ in range(6)]
    assert started == [False] * 5 + [True]
    assert admission.admit_socket(A, None, now=2) is Refusal.COOLDOWN
    assert admission.admit_http(A, now=2) == pytest.approx(59)
    assert admission.admit_socket(B, None, now=2) is None  # Other addresses are not affected.
    assert admission.handshake_failed(A, now=3) is False  # Already cooling down: not a new cool-down...
    assert admission.cooling_down(A, now=3) == pytest.approx(60)  # ...but it extends it.
    assert admission.admit_socket(A, None, now=64) is None


def test_failures_spread_over_minutes_never_cool_down():
    admission = Admission(LIMITS, now=0)
    assert not any(admission.handshake_failed(A, now=t * 12.5) for t in range(100))


def test_connections_per_address_are_capped_and_released():
    admission = Admission(LIMITS, now=0)
    assert [admission.admit_socket(A, None, 0) for _ in range(3)] == [None, None, Refusal.ADDRESS_LIMIT]
    admission.release_socket(A, None)
    assert admission.admit_socket(A, None, 0) is None


def test_connections_per_token_are_capped_across_addresses():
    admission = Admission(LIMITS, now=0)
    outcomes = [admission.admit_socket(address, "t1", 0) for address in (A, B, "192.0.2.1", "192.0.2.2")]
    assert outcomes == [None, None, None, Refusal.TOKEN_LIMIT]
    assert admission.admit_socket("192.0.2.2", "t2", 0) is None
    admission.release_socket(A, "t1")
    assert admission.admit_socket("192.0.2.2", "t1", 0) is None


def test_exempt_addresses_are_never_limited_by_address_but_tokens_still_are():
    admission = Admission(LIMITS, now=0)
    assert all(admission.handshake_failed("127.0.0.1", 0) is False for _ in range(100))
    assert [admission.admit_socket("127.0.0.1", None, 0) for _ in range(10)] == [None] * 10
    assert admission.admit_http("::1", 0) == 0.0
    assert [admission.admit_socket("::1", "t", 0) for _ in range(4)][-1] is Refusal.TOKEN_LIMIT


def test_ipv6_peers_are_limited_per_64():
    admission = Admission(LIMITS, now=0)
    assert address_key("2001:db8:1:2::5") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    outcomes = [admission.admit_socket(f"2001:db8:1:2::{i}", None, 0) for i in range(1, 4)]
    assert outcomes == [None, None, Refusal.ADDRESS_LIMIT]
    assert admission.admit_socket("2001:db8:1:3::1", None, 0) is None


def test_http_requests_are_rate_limited_per_address():
    admission = Admission(LIMITS, now=0)
    waits = [admission.admit_http(A, now=0) for _ in range(5)]
    assert waits[:4] == [0.0] * 4 and waits[4] == pytest.approx(0.5)
    assert admission.admit_http(B, now=0) == 0.0
    assert admission.admit_http(A, now=0.5) == 0.0


def test_zero_turns_limits_off():
    admission = Admission(AdmissionLimits(0, 0, 0, 60, 0, 1), now=0)
    assert all(admission.admit_socket(A, "t", 0) is None for _ in range(5000))
    assert not any(admission.handshake_failed(A, 0) for _ in range(5000))
    assert all(admission.admit_http(A, 0) == 0.0 for _ in range(5000))


@given(st.lists(st.tuples(st.sampled_from(["fail", "http", "open"]), st.integers(0, 2**32 - 1)), max_size=300))
def test_memory_returns_to_nothing_once_every_peer_has_gone_and_time_has_passed(events):
    admission = Admission(LIMITS, now=0)
    opened = []
    for kind, n in events:
        address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        if kind == "fail":
            admission.handshake_failed(address, 1)
        elif kind == "http":
            admission.admit_http(address, 1)
        elif admission.admit_socket(address, f"t{n % 7}", 1) is None:
            opened.append((address, f"t{n % 7}"))
    for address, token in opened:
        admission.release_socket(address, token)
    admission.prune(1000)
    assert admission.tracked() == 0


def test_origins_the_appliances_own_configured_ones_and_nothing_else():
    policy = OriginPolicy("https://game.example.com, http://localhost:3000", public_url="https://bridge.example.com/")
    assert policy.allows("https://game.example.com", "bridge.example.com", "https")
    assert policy.allows("HTTPS://Game.Example.com:443", "bridge.example.com", "https")
    assert policy.allows("http://localhost:3000", "127.0.0.1:8000", "http")
    assert policy.allows("https://bridge.example.com", "internal:8000", "http")  # PUBLIC_URL
    assert policy.allows("http://127.0.0.1:8000", "127.0.0.1:8000", "ws")  # same origin (the dashboard)
    assert policy.allows("https://bridge.example.com", "bridge.example.com", "http")  # behind a TLS proxy
    assert not policy.allows("https://evil.example", "bridge.example.com", "https")
    assert not policy.allows("https://game.example.com.evil.example", "bridge.example.com", "https")
    assert not policy.allows("http://127.0.0.1:9999", "127.0.0.1:8000", "http")
    assert not policy.allows("null", "bridge.example.com", "https")
    assert not policy.allows("not a url", "bridge.example.com", "https")
    assert OriginPolicy("*").allows("https://anything.example", None, "https")
    assert OriginPolicy("null").allows("null", None, "http")


def test_log_flood_keeps_a_burst_then_a_rate_and_counts_the_rest():
    now = [0.0]
    flood = LogFlood(burst=3, rate=1, clock=lambda: now[0])
    before = SUPPRESSED.labels(logger="appliance.web")._value.get()

    def record(msg, level=logging.INFO, name="appliance.web"):
        return logging.LogRecord(name, level, __file__, 1, msg, ("x",), None)

    kept = [flood.filter(record("Refused connection for id %r")) for _ in range(10)]
    assert kept == [True] * 3 + [False] * 7
    assert flood.filter(record("Another kind of line %s"))  # Each kind has its own budget.
    assert flood.filter(record("Refused connection for id %r", logging.ERROR))  # Errors are never dropped.
    now[0] = 1.0
    assert flood.filter(record("Refused connection for id %r"))
    assert SUPPRESSED.labels(logger="appliance.web")._value.get() - before == 7
