from appliance.core.ratelimit import TokenBucket


def test_burst_then_refill_at_rate():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take(0.0) == 0.1
    assert bucket.try_take(0.05) > 0
    assert bucket.try_take(0.1) == 0.0


def test_refill_never_exceeds_burst():
    bucket = TokenBucket(rate=100, burst=2, now=0.0)
    bucket.try_take(0.0)
    taken = [bucket.try_take(100.0) for _ in range(3)]
    assert taken[:2] == [0.0, 0.0] and taken[2] > 0


def test_reserve_goes_into_debt_and_says_how_long_to_wait():
    bucket = TokenBucket(rate=10, burst=1, now=0.0)
    assert bucket.reserve(0.0) == 0.0
    assert abs(bucket.reserve(0.0) - 0.1) < 1e-9
    assert abs(bucket.reserve(0.0) - 0.2) < 1e-9
    assert bucket.reserve(1.0) == 0.0  # Debt paid off after a second at 10/s.


def test_zero_rate_is_unlimited():
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.try_take(0.0) == 0.0 for _ in range(10_000))
    assert all(bucket.reserve(0.0) == 0.0 for _ in range(10_000))
