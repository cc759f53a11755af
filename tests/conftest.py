"""Fixtures shared by every test folder: real Redis, real appliance processes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from leak_scan import SCAN
from support import Appliance, RedisServer

# Property tests: the same examples every run in CI (derandomized, no deadline on a shared
# machine) so they never flake; HYPOTHESIS_PROFILE=thorough explores far more, randomly.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=5_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def no_secret_leaks() -> Iterator[None]:
    """Fails the run if a token or password appears in anything the tests captured (SECURITY.md).

    Session-scoped and requested first, so it is torn down last: after every appliance
    has stopped and written its final log lines.
    """
    yield
    leaks = SCAN.leaks()
    assert not leaks, f"secrets leaked ({SCAN.summary()}): " + "; ".join(leaks)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session; tests that kill Redis use ``own_redis`` instead."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_appliance() -> Iterator:
    """Start appliances with custom settings; all are stopped (SIGTERM) after the test."""
    started: list[Appliance] = []

    def start(
        env: dict[str, str] | None = None, *, redis_url: str | None = None, name: str = "app", wait_ready: bool = True
    ) -> Appliance:
        app = Appliance(env, redis_url=redis_url, name=name)
        started.append(app)
        return app.start(wait_ready=wait_ready)

    yield start
    for app in started:
        app.stop()


@pytest.fixture(scope="module", params=["memory", "redis"])
def relay(request: pytest.FixtureRequest) -> Iterator[Appliance]:
    """The same tests against the embedded broker and against Redis (one contract, two backends)."""
    redis_url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    app = Appliance(redis_url=redis_url, name=f"relay-{request.param}")
    app.start()
    yield app
    app.stop()
