"""The clients table's query (ui/query.py): filters, sorts and cursor pages over presence records."""

from __future__ import annotations

import random

from ui.query import ClientQuery, run_query, summarize


def record(i: int, **extra) -> dict:
    return {
        "id": f"c-{i:05d}",
        "role": "controller" if i % 10 == 0 else "client",
        "instance": f"inst-{i % 2}",
        "connected_since": f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
        "remote": "10.0.0.1:1",
        "messages_in": i % 7,
        "messages_out": i % 5,
        "last_activity": "2026-01-01T01:00:00+00:00",
        **extra,
    }


RECORDS = [record(i) for i in range(1000)]


def all_pages(records, **params) -> list[dict]:
    seen, cursor = [], ""
    while True:
        page = run_query(records, ClientQuery.from_params({**params, "cursor": cursor}))
        seen.extend(page.rows)
        if not page.next_cursor:
            return seen
        cursor = page.next_cursor


def test_paging_by_cursor_visits_every_matching_row_once_in_order():
    for sort in ("id", "messages_in", "connected_since", "instance"):
        for order in ("asc", "desc"):
            rows = all_pages(random.sample(RECORDS, len(RECORDS)), sort=sort, order=order, limit="25")
            keys = [ClientQuery(sort=sort).key(r) for r in rows]
            assert keys == sorted(keys, reverse=order == "desc")
            assert len({r["id"] for r in rows}) == 1000


def test_a_cursor_survives_rows_added_and_removed_before_it():
    first = run_query(RECORDS, ClientQuery.from_params({"limit": "25"}))
    changed = [r for r in RECORDS if r["id"] != "c-00003"] + [record(5000, id="a-new")]
    second = run_query(changed, ClientQuery.from_params({"limit": "25", "cursor": first.next_cursor}))
    assert second.rows[0]["id"] == "c-00025"


def test_filters_combine():
    page = run_query(RECORDS, ClientQuery.from_params({"q": "c-001", "role": "controller", "instance": "inst-0"}))
    assert [r["id"] for r in page.rows] == [f"c-001{i}0" for i in range(10)]
    assert page.matching == 10 and page.total == 1000


def test_search_finds_a_piece_of_the_id_the_address_or_a_group_in_any_case():
    records = [
        record(1, id="Unity-Lobby-01", remote="10.1.2.3:5000"),
        record(2, id="robot-7", remote="192.168.9.9:1", groups=["Kitchen", "lights"]),
        record(3, id="other", remote="172.16.0.1:2"),
    ]

    def ids(q: str) -> list[str]:
        return [r["id"] for r in run_query(records, ClientQuery.from_params({"q": q})).rows]

    assert ids("lobby") == ["Unity-Lobby-01"]  # Inside the id, any case.
    assert ids("LOBBY-0") == ["Unity-Lobby-01"]
    assert ids("192.168.") == ["robot-7"]  # By address.
    assert ids("kitch") == ["robot-7"]  # By group.
    assert ids("zzz") == []
    assert ids("") == ["Unity-Lobby-01", "other", "robot-7"]


def test_groups_and_token_version_filter_when_presence_has_them():
    records = [record(1, groups=["red", "blue"], token_version=2), record(2, groups=["red"], token_version=3)]
    assert [r["id"] for r in run_query(records, ClientQuery(group="blue")).rows] == ["c-00001"]
    assert [r["id"] for r in run_query(records, ClientQuery(token_version="3")).rows] == ["c-00002"]
    named = [record(3, token="UNITY_CLIENT_TOKEN", token_version=2), record(4, token="ADMIN_TOKEN", token_version=2)]
    query = ClientQuery.from_params({"token_version": "UNITY_CLIENT_TOKEN:2"})
    assert [r["id"] for r in run_query(named, query).rows] == ["c-00003"]


def test_bad_parameters_fall_back_to_defaults():
    query = ClientQuery.from_params({"sort": "__class__", "limit": "1e9", "role": "<x>", "order": "sideways"})
    assert (query.sort, query.limit, query.role, query.descending) == ("id", 50, "", False)
    for cursor in ("!!", "W10", "WyJhIiwxLDJd", "a" * 900):  # junk, [], ["a",1,2], long junk
        assert run_query(RECORDS, ClientQuery(cursor=cursor)).first


def test_summary_counts_roles_instances_and_messages():
    assert summarize(RECORDS[:20]) == {
        "connections": 20,
        "clients": 18,
        "controllers": 2,
        "instances": 2,
        "messages_in": sum(i % 7 for i in range(20)),
        "messages_out": sum(i % 5 for i in range(20)),
    }


def test_audit_query_filters_by_actor_target_and_utc_time_range():
    from appliance.audit import AuditEvent
    from ui.query import AuditQuery

    events = [
        AuditEvent("client.disconnect", "ADMIN_TOKEN", "1.2.3.4", "Unity-7", at=1_800_000_100.0),
        AuditEvent("login", "VIEWER_TOKEN", "1.2.3.4", at=1_800_000_050.0),
        AuditEvent("client.disconnect", "ADMIN_TOKEN", "1.2.3.4", "other", at=1_800_000_000.0),
    ]

    def chosen(**params: str) -> list[str]:
        return [f"{e.action}:{e.target}" for e in AuditQuery.from_params(params).select(events)]

    assert chosen(actor="viewer") == ["login:"]
    assert chosen(target="unity") == ["client.disconnect:Unity-7"]
    # datetime-local values are UTC: 1_800_000_050 is 2027-01-15T08:00:50Z.
    assert chosen(since="2027-01-15T08:00:50") == ["client.disconnect:Unity-7", "login:"]
    assert chosen(until="2027-01-15T08:00:49") == ["client.disconnect:other"]
    assert chosen(since="not a time") == [e for e in chosen()]  # Unreadable: ignored, not an error.
    assert chosen(limit="50", action="client.") == ["client.disconnect:Unity-7", "client.disconnect:other"]
