"""The embedded broker's offline queue at scale (issue 20 item 8): no scan per command, a total bound.

Enqueuing once re-scanned every queued command (2,000 queued took 1.6 s, the next 8,000
13.5 s, and /healthz stalled). The budget below is CPU time, so a busy machine does not
move it: 20,000 commands cost a fraction of a second now, and most of a minute before.
"""

import time

from appliance.core.requests import Enqueued, OfflineQueue, Routed


def routed(command_id, controller="LLM", timeout_ms=60_000):
    return Routed(controller, command_id, "m", "a", "owner-1", timeout_ms)


def test_many_queued_commands_are_added_without_rescanning_the_others():
    queue = OfflineQueue(max_per_target=10, remember_seconds=60, max_total=1_000_000)
    started = time.process_time()
    for n in range(20_000):
        assert queue.enqueue(f"t{n % 2000}", routed(n, timeout_ms=60_000 + n), n / 1000) is Enqueued.QUEUED
    assert time.process_time() - started < 10, "enqueue scans what is queued"
    assert len(queue) == 20_000
    # Expiry still happens, in deadline order and only for what is due (60 s + 2 ms per command).
    expired = queue.expire(80.0)
    assert [r.id for r in expired] == list(range(10_001)) and len(queue) == 20_000 - 10_001


def test_the_total_across_clients_is_bounded():
    queue = OfflineQueue(max_per_target=10, remember_seconds=60, max_total=3)
    for n in range(3):
        assert queue.enqueue(f"t{n}", routed(n), 0.0) is Enqueued.QUEUED
    assert queue.enqueue("t9", routed(9), 0.0) is Enqueued.FULL
    assert queue.take("t0", 0.1) == [routed(0)]  # Taken: room again.
    assert queue.enqueue("t9", routed(9), 0.2) is Enqueued.QUEUED
    assert queue.expire(1000.0) and len(queue) == 0  # Expired: room too.
    assert queue.enqueue("t8", routed(8), 1000.0) is Enqueued.QUEUED


def test_an_entry_expired_out_of_order_is_neither_delivered_nor_counted():
    queue = OfflineQueue(max_per_target=2, remember_seconds=60)
    long_, short = routed("l", timeout_ms=10_000), routed("s", timeout_ms=100)
    queue.enqueue("u1", long_, 0.0)
    queue.enqueue("u1", short, 0.0)
    assert queue.expire(0.5) == [short]
    assert queue.enqueue("u1", routed("x"), 0.6) is Enqueued.QUEUED  # The expired one no longer counts.
    assert queue.take("u1", 0.7) == [long_, routed("x")]
    assert len(queue) == 0 and queue.expire(20.0) == []
