"""The leak scan finds a secret wherever the helpers captured it, and names it without showing it."""

from __future__ import annotations

from leak_scan import LeakScan, secrets_in_env

SECRET = "s3cr3t-token-value-0123456789"


def test_a_secret_in_a_log_file_is_reported_by_name_and_source(tmp_path):
    log = tmp_path / "app.log"
    log.write_text(f"INFO something\nDEBUG header X-Auth-Token: {SECRET}\n")
    scan = LeakScan()
    scan.add_secrets({"CLIENT_TOKEN": SECRET})
    scan.add_log(log, "relay-memory")
    leaks = scan.leaks()
    assert leaks == ["CLIENT_TOKEN in log of relay-memory (app.log)"]
    assert SECRET not in " ".join(leaks)


def test_captured_frames_bodies_and_reasons_are_scanned():
    scan = LeakScan()
    scan.add_secrets({"ADMIN_TOKEN": SECRET})
    scan.capture("close reason (4001)", "missing or invalid X-Auth-Token")
    scan.capture("HTTP body of GET /metrics", f'wsbridge_x{{token="{SECRET}"}} 1'.encode())
    assert scan.leaks() == ["ADMIN_TOKEN in HTTP body of GET /metrics"]


def test_clean_captures_and_missing_logs_report_nothing(tmp_path):
    scan = LeakScan()
    scan.add_secrets({"ADMIN_TOKEN": SECRET})
    scan.add_log(tmp_path / "gone.log", "removed")
    scan.capture("error frame", '{"error":"target_offline","detail":"x"}')
    assert scan.leaks() == []


def test_short_values_are_not_secrets_and_redis_url_passwords_are():
    env = {
        "LLM_SECRET_TOKEN": SECRET,
        "LOG_LEVEL": "INFO",
        "X_TOKEN": "short",
        "REDIS_URL": "redis://:p%40ssword-99@h:1/0",
    }
    assert secrets_in_env(env) == {"LLM_SECRET_TOKEN": SECRET, "REDIS_URL password": "p@ssword-99"}


def test_the_session_scan_knows_the_test_tokens_and_every_started_appliance():
    from leak_scan import SCAN
    from support import CLIENT_TOKEN, Appliance

    assert CLIENT_TOKEN in SCAN.secrets.values()
    app = Appliance({"VIEWER_TOKEN": "viewer-token-for-the-leak-scan"}, name="leakscan")
    try:
        assert app.log_path in SCAN.log_files
        assert SCAN.secrets["VIEWER_TOKEN"] == "viewer-token-for-the-leak-scan"
    finally:
        app.stop()
