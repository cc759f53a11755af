"""ByLastWrite: per-id values forgotten after their ttl and beyond max_ids, clock passed in."""

import pytest

from appliance.core.expiring import ByLastWrite


def test_a_value_is_forgotten_ttl_seconds_after_its_last_write():
    values: ByLastWrite[str] = ByLastWrite(max_ids=10, ttl=60)
    values.put("a", "first", now=1000)
    values.put("b", "other", now=1030)
    assert values.get("a", now=1059) == "first"
    values.put("a", "again", now=1059)  # Written again: its 60 s start over, and it is the newest.
    assert values.get("a", now=1100) == "again"
    assert values.get("b", now=1100) is None  # 70 s after its write.
    assert len(values) == 1


def test_the_id_written_longest_ago_goes_first_beyond_max_ids():
    values: ByLastWrite[int] = ByLastWrite(max_ids=2, ttl=60)
    values.put("a", 1, now=0)
    values.put("b", 2, now=1)
    values.put("a", 3, now=2)  # "a" is now newer than "b".
    values.put("c", 4, now=3)
    assert (values.get("a", now=3), values.get("b", now=3), values.get("c", now=3)) == (3, None, 4)


def test_pop_takes_the_value_once_and_never_an_expired_one():
    values: ByLastWrite[str] = ByLastWrite(max_ids=10, ttl=60)
    values.put("a", "x", now=0)
    values.put("b", "y", now=0)
    assert values.pop("a", now=10) == "x"
    assert values.pop("a", now=10) is None
    assert values.pop("b", now=60) is None


@pytest.mark.parametrize("args", [(0, 1), (1, 0), (1, -1)])
def test_bounds_that_keep_nothing_are_refused(args):
    with pytest.raises(ValueError):
        ByLastWrite(*args)
