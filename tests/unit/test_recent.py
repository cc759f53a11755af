"""A client's recent commands, pure parts: the bounded ring, reply matching, outcomes, the closed-log book."""

from __future__ import annotations

import pytest

from appliance.core.recent import ClosedLogs, CommandLog, cut


def test_a_command_without_id_has_no_reply_correlation():
    log = CommandLog(5, 100)
    log.untracked(1000.0, "llm", None, "MoveForward 10")
    assert log.view(1001.0) == [
        {
            "at": "1970-01-01T00:16:40.000+00:00",
            "controller": "llm",
            "id": None,
            "message": "MoveForward 10",
            "outcome": "uncorrelated",
        }
    ]


def test_a_reply_is_matched_to_its_command_by_key_with_its_round_trip_time():
    log = CommandLog(5, 100)
    first, second = object(), object()
    log.tracked(1000.0, "llm", "a", "ping", 1030.0, first)
    log.tracked(1000.5, "http", 7, "status", 1030.0, second)
    assert log.replied(second, 1000.75, "ok")
    assert log.replied(first, 1002.0, "pong")
    newest, oldest = log.view(1003.0)
    assert newest["id"] == 7 and newest["reply"] == "ok" and newest["rtt_ms"] == 250.0
    assert newest["outcome"] == "replied" and newest["controller"] == "http"
    assert oldest["id"] == "a" and oldest["reply"] == "pong" and oldest["rtt_ms"] == 2000.0


def test_a_second_reply_to_the_same_command_is_not_recorded():
    log = CommandLog(5, 100)
    key = object()
    log.tracked(1000.0, "llm", "a", "ping", 1030.0, key)
    assert log.replied(key, 1001.0, "pong")
    assert not log.replied(key, 1002.0, "again")
    assert not log.replied(object(), 1002.0, "stranger")
    assert log.view(1003.0)[0]["reply"] == "pong"


def test_pending_until_the_deadline_then_timeout():
    log = CommandLog(5, 100)
    log.tracked(1000.0, "llm", "a", "ping", 1005.0, object())
    assert log.view(1004.9)[0]["outcome"] == "pending"
    assert log.view(1005.0)[0]["outcome"] == "timeout"
    assert "reply" not in log.view(1005.0)[0]


def test_a_failed_command_says_why():
    log = CommandLog(5, 100)
    log.failed(1000.0, "llm", "a", "ping", "queue_full: 64 commands already wait")
    (entry,) = log.view(2000.0)
    assert entry["outcome"] == "error" and entry["detail"].startswith("queue_full")


def test_the_ring_keeps_the_last_n_newest_first():
    log = CommandLog(3, 100)
    for i in range(5):
        log.untracked(1000.0 + i, "llm", None, f"m{i}")
    assert [e["message"] for e in log.view(2000.0)] == ["m4", "m3", "m2"]
    assert [e["message"] for e in log.view(2000.0, limit=2)] == ["m4", "m3"]
    assert len(log) == 3


def test_a_reply_to_a_command_that_left_the_ring_is_dropped():
    log = CommandLog(2, 100)
    key = object()
    log.tracked(1000.0, "llm", "a", "ping", 1030.0, key)
    log.untracked(1001.0, "llm", None, "x")
    log.untracked(1002.0, "llm", None, "y")
    assert not log.replied(key, 1003.0, "pong")
    assert [e["message"] for e in log.view(1004.0)] == ["y", "x"]


def test_messages_and_replies_are_cut_to_the_cap():
    log = CommandLog(5, 4)
    key = object()
    log.untracked(1000.0, "llm", None, "abcdefgh")
    log.tracked(1001.0, "llm", "a", "12345678", 1030.0, key)
    log.replied(key, 1002.0, "wxyz0123")
    tracked, untracked = log.view(1003.0)
    assert untracked["message"] == "abcd…"
    assert tracked["message"] == "1234…" and tracked["reply"] == "wxyz…"
    assert cut("abcd", 4) == "abcd"


def test_a_log_needs_room():
    with pytest.raises(ValueError):
        CommandLog(0, 10)
    with pytest.raises(ValueError):
        ClosedLogs(0, 10)


def test_closed_logs_expire_and_are_bounded():
    book = ClosedLogs(2, 60)
    logs = {}
    for i, name in enumerate(("a", "b", "c")):
        logs[name] = CommandLog(3, 10)
        logs[name].untracked(1000.0, "llm", None, name)
        book.keep(name, logs[name], 1000.0 + i)
    assert book.get("a", 1003.0) is None  # Closed longest ago: evicted by the cap.
    assert book.get("b", 1003.0) is logs["b"]
    assert book.get("b", 1061.0) is None  # ttl passed
    assert book.get("c", 1061.0) is logs["c"]
    assert book.take("c", 1061.0) is logs["c"]
    assert book.get("c", 1061.0) is None  # Taken back by a reconnect.
    assert len(book) == 0


def test_an_empty_log_is_not_kept():
    book = ClosedLogs(2, 60)
    book.keep("a", CommandLog(3, 10), 1000.0)
    assert len(book) == 0
