"""REDIS_SENTINELS / REDIS_SENTINEL_MASTER / REDIS_SENTINEL_PASSWORD and REDIS_CLUSTER: read, checked, hidden."""

import pytest
from pydantic import ValidationError

from appliance.brokers.redis import RedisTarget
from appliance.settings import Settings


def make(monkeypatch, tmp_path, **env):
    monkeypatch.chdir(tmp_path)  # No .env from the developer's tree.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_sentinels_make_a_sentinel_target_with_both_passwords(monkeypatch, tmp_path):
    settings = make(
        monkeypatch,
        tmp_path,
        REDIS_SENTINELS="10.0.0.5:26379, sentinel-b:26380,[::1]:26381",
        REDIS_SENTINEL_MASTER="wsb",
        REDIS_SENTINEL_PASSWORD="sentinel-secret",
        REDIS_PASSWORD="data-secret",
    )
    assert settings.redis_enabled
    target = RedisTarget.from_settings(settings)
    assert target.sentinels == (("10.0.0.5", 26379), ("sentinel-b", 26380), ("::1", 26381))
    assert (target.sentinel_master, target.sentinel_password, target.password) == (
        "wsb",
        "sentinel-secret",
        "data-secret",
    )
    assert target.kind == "sentinel" and not target.url
    assert "secret" not in repr(target)
    display = settings.redis_display()
    assert display == "sentinel wsb via 10.0.0.5:26379,sentinel-b:26380,::1:26381" and "secret" not in display
    assert {"sentinel-secret", "data-secret"} <= set(settings.secret_values())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_SENTINELS": "10.0.0.5:26379"}, "needs REDIS_SENTINEL_MASTER"),
        ({"REDIS_SENTINELS": "10.0.0.5", "REDIS_SENTINEL_MASTER": "m"}, "host:port"),
        ({"REDIS_SENTINELS": "a:1,:2", "REDIS_SENTINEL_MASTER": "m"}, "host:port"),
        ({"REDIS_SENTINELS": "a:99999", "REDIS_SENTINEL_MASTER": "m"}, "host:port"),
        ({"REDIS_SENTINEL_MASTER": "m"}, "needs REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_URL": "redis://x:6379/0"}, "not both"),
        ({"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_CLUSTER": "true"}, "exclude each other"),
        ({"REDIS_CLUSTER": "true"}, "needs REDIS_URL or REDIS_HOST"),
    ],
)
def test_an_inconsistent_topology_is_refused_with_a_clear_reason(monkeypatch, tmp_path, env, message):
    with pytest.raises(ValidationError, match=message):
        make(monkeypatch, tmp_path, **env)


def test_cluster_mode_names_any_node(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, REDIS_URL="redis://:pw@node-3:7001/0", REDIS_CLUSTER="true")
    target = RedisTarget.from_settings(settings)
    assert target.kind == "cluster" and target.url == "redis://:pw@node-3:7001/0"
    assert settings.redis_display() == "cluster via redis://node-3:7001"


def test_one_url_stays_the_default(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, REDIS_URL="rediss://:token@primary.example.cache.amazonaws.com:6379/0")
    assert RedisTarget.from_settings(settings).kind == "single"


def test_every_redis_client_is_made_from_the_target():
    """With Sentinels there is no URL: a client built from REDIS_URL would break that deployment at start."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    allowed = {root / "appliance" / "settings.py", root / "appliance" / "brokers" / "redis" / "target.py"}
    offenders = [
        str(path.relative_to(root))
        for folder in ("appliance", "ui")
        for path in (root / folder).rglob("*.py")
        if path not in allowed
        and ("redis_connection_url(" in path.read_text() or "Redis.from_url(" in path.read_text())
    ]
    assert offenders == [], f"use RedisTarget.from_settings(settings).client() or .sync_client(): {offenders}"
