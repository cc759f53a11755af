"""The dashboard's one time format and its status values (ui/templating.py)."""

from __future__ import annotations

from ui.templating import ago, shown, when

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def test_a_time_is_relative_with_the_absolute_utc_time_on_hover():
    html = str(when(NOW - 190, now=NOW))
    assert html == '<time datetime="2027-01-15T07:56:50Z" title="2027-01-15 07:56:50 UTC">3 min ago</time>'
    assert str(when("2027-01-15T08:00:00+00:00", now=NOW)).endswith(">0 s ago</time>")  # ISO times too.


def test_no_time_says_so_and_a_future_time_says_in():
    assert str(when(None)) == "—"
    assert str(when(None, "never")) == "never"
    assert ago(NOW + 600, now=NOW) == "in 10 min"


def test_client_controlled_text_in_a_time_stays_escaped():
    assert str(when("<script>", "<b>")) == "&lt;b&gt;"


def test_status_values_read_as_values_not_python_reprs():
    assert shown(True) == "yes" and shown(False) == "no"
    assert shown(None) == "—"
    assert str(shown(NOW, "last_refresh")).startswith('<time datetime="2027-01-15T08:00:00Z"')
    assert shown({"store": "ssm", "ok": True}) == "store: ssm, ok: yes"
    assert shown(["a", "b"]) == "a, b"
    assert shown(0.123456) == "0.123"
