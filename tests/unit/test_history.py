"""The connect history's pure parts: the entry of a closed connection, and the bounded in-memory book."""

from __future__ import annotations

import pytest

from appliance.core.history import MAX_REASON_CHARS, HistoryBook, close_entry

PRESENCE = {
    "id": "unity-1",
    "role": "client",
    "instance": "eu-1",
    "remote": "203.0.113.7:5123",
    "token": "UNITY_CLIENT_TOKEN",
    "token_version": 3,
    "protocol": 2,
    "messages_in": 5,
    "messages_out": 7,
}


def test_an_entry_says_when_where_how_and_who_closed():
    entry = close_entry(PRESENCE, connected_at=1000.0, closed_at=1012.5, code=4010, reason="replaced", by_relay=True)
    assert entry == {
        "connected_at": "1970-01-01T00:16:40.000+00:00",
        "closed_at": "1970-01-01T00:16:52.500+00:00",
        "duration_seconds": 12.5,
        "role": "client",
        "instance": "eu-1",
        "remote": "203.0.113.7:5123",
        "token": "UNITY_CLIENT_TOKEN",
        "token_version": 3,
        "protocol": 2,
        "messages_in": 5,
        "messages_out": 7,
        "code": 4010,
        "reason": "replaced",
        "closed_by": "relay",
    }


def test_a_peer_close_without_a_code_is_1005_and_a_long_reason_is_cut():
    v1 = {k: v for k, v in PRESENCE.items() if k != "protocol"}
    entry = close_entry(v1, connected_at=5.0, closed_at=4.0, code=None, reason="x" * 500, by_relay=False)
    assert (entry["code"], entry["closed_by"], entry["protocol"]) == (1005, "peer", 1)
    assert len(entry["reason"]) == MAX_REASON_CHARS
    assert entry["duration_seconds"] == 0.0  # A clock step backwards never gives a negative duration.


def test_the_book_keeps_the_newest_entries_per_id_newest_first():
    book = HistoryBook(per_id=3, max_ids=10, ttl=100)
    for n in range(5):
        book.add("a", {"n": n}, now=float(n))
    assert [e["n"] for e in book.entries("a", 10, now=5)] == [4, 3, 2]
    assert [e["n"] for e in book.entries("a", 2, now=5)] == [4, 3]
    assert book.entries("a", 0, now=5) == []
    assert book.entries("nobody", 10, now=5) == []


def test_the_book_forgets_the_id_written_longest_ago_beyond_max_ids():
    book = HistoryBook(per_id=2, max_ids=2, ttl=100)
    book.add("a", {"n": 1}, now=1)
    book.add("b", {"n": 2}, now=2)
    book.add("a", {"n": 3}, now=3)  # a is now the most recently written
    book.add("c", {"n": 4}, now=4)
    assert len(book) == 2
    assert book.entries("b", 10, now=4) == []
    assert [e["n"] for e in book.entries("a", 10, now=4)] == [3, 1]


def test_the_book_expires_an_id_ttl_seconds_after_its_last_entry():
    book = HistoryBook(per_id=5, max_ids=10, ttl=60)
    book.add("a", {"n": 1}, now=0)
    book.add("b", {"n": 2}, now=30)
    book.add("a", {"n": 3}, now=50)  # renews a
    assert [e["n"] for e in book.entries("b", 10, now=89)] == [2]
    assert book.entries("b", 10, now=90) == []
    assert [e["n"] for e in book.entries("a", 10, now=109)] == [3, 1]
    assert book.entries("a", 10, now=110) == []
    assert len(book) == 0


@pytest.mark.parametrize("args", [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_the_book_refuses_bounds_that_keep_nothing(args):
    with pytest.raises(ValueError):
        HistoryBook(*args)
