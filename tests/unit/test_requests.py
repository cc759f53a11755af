"""Pending commands, v1 reply matching and the offline queue: feed events with a clock, assert outcomes."""

from appliance.core.requests import Enqueued, Held, OfflineQueue, PendingTable, Routed, V1Matcher


def routed(command_id, controller="LLM", message="m", timeout_ms=1000, owner="conn-1"):
    return Routed(controller, command_id, message, "instance-a", owner, timeout_ms)


# --- PendingTable ---------------------------------------------------------------------------


def test_pending_entry_times_out_at_its_deadline_once():
    table = PendingTable()
    assert table.open("c", "id-1", "u1", now=10.0, timeout_ms=500) is not None
    assert table.next_deadline() == 10.5
    assert table.expire(10.499) == []
    [expired] = table.expire(10.5)
    assert (expired.waiter, expired.id, expired.target) == ("c", "id-1", "u1")
    assert table.expire(20.0) == []
    assert len(table) == 0
    assert table.next_deadline() is None


def test_a_second_command_with_the_same_id_in_flight_is_refused_but_other_owners_may_use_it():
    table = PendingTable()
    assert table.open("c", 1, "u1", 0.0, 1000) is not None
    assert table.open("c", 1, "u2", 0.0, 1000) is None
    assert table.open("other", 1, "u1", 0.0, 1000) is not None


def test_reply_finishes_the_entry_so_it_never_times_out():
    table = PendingTable()
    table.open("c", "x", "u1", 0.0, 100)
    assert table.delivered("c", "x") is not None
    assert table.delivered("c", "x") is None  # "delivered" is reported once
    pending = table.finish("c", "x")
    assert pending is not None and pending.delivered
    assert table.finish("c", "x") is None
    assert table.expire(10.0) == []
    assert table.next_deadline() is None  # the stale heap entry is skipped


def test_outcome_after_timeout_is_ignored():
    table = PendingTable()
    table.open("c", "x", "u1", 0.0, 100)
    assert len(table.expire(0.1)) == 1
    assert table.delivered("c", "x") is None
    assert table.finish("c", "x") is None


def test_expiry_order_follows_deadlines_not_insertion():
    table = PendingTable()
    table.open("c", "slow", "u1", 0.0, 900)
    table.open("c", "fast", "u1", 0.0, 100)
    assert [p.id for p in table.expire(0.5)] == ["fast"]
    assert [p.id for p in table.expire(1.0)] == ["slow"]


def test_answered_commands_do_not_pile_up_in_the_deadline_heap_and_live_ones_still_expire_in_order():
    # Replies come long before a minute-long deadline: the heap must not keep a minute of traffic.
    table = PendingTable()
    table.open("c", "same-deadline-1", "u1", 0.0, 60_000)
    table.open("c", "same-deadline-2", "u1", 0.0, 60_000)
    table.open("c", "early", "u1", 0.0, 30_000)
    for i in range(20_000):
        table.open("c", i, "u1", i / 1000, 60_000)
        table.finish("c", i)
    assert len(table._deadlines) < 3 * 1024  # bounded by the live entries, not by the traffic
    table.open("c", 1, "u1", 100.0, 10)  # an id reused after it finished: only its new deadline counts
    assert table.next_deadline() == 30.0
    assert [p.id for p in table.expire(59.0)] == ["early"]
    assert [p.id for p in table.expire(60.0)] == ["same-deadline-1", "same-deadline-2"]  # ties keep their order
    assert [p.id for p in table.expire(100.01)] == [1]
    assert len(table) == 0


def test_dropping_a_waiter_forgets_only_its_entries():
    table = PendingTable()
    table.open("a", 1, "u", 0.0, 100)
    table.open("a", 2, "u", 0.0, 100)
    table.open("b", 1, "u", 0.0, 100)
    assert sorted(p.id for p in table.drop_waiter("a")) == [1, 2]
    assert [p.waiter for p in table.expire(1.0)] == ["b"]


# --- V1Matcher ---------------------------------------------------------------------------------


def test_first_command_goes_at_once_and_the_next_message_is_its_reply():
    matcher = V1Matcher(max_waiting=2)
    first = routed("a")
    assert matcher.submit("u1", first, 0.0) is Held.SEND
    advance = matcher.client_message("u1", 0.1)
    assert advance.replied == first
    assert advance.send is None
    assert matcher.in_flight("u1") is None


def test_answered_v1_commands_do_not_pile_up_in_the_deadline_heap():
    matcher = V1Matcher(max_waiting=2)
    for i in range(20_000):
        assert matcher.submit("u1", routed(i, timeout_ms=60_000), i / 1000) is Held.SEND
        assert matcher.client_message("u1", i / 1000).replied is not None
    assert len(matcher._deadlines) < 3 * 1024
    matcher.submit("u1", routed("late", timeout_ms=100), 50.0)
    assert matcher.next_deadline() == 50.1
    assert list(matcher.expire(50.1)) == ["u1"]


def test_later_commands_wait_in_order_and_are_handed_over_one_at_a_time():
    matcher = V1Matcher(max_waiting=2)
    a, b, c = routed("a"), routed("b"), routed("c")
    assert matcher.submit("u1", a, 0.0) is Held.SEND
    assert matcher.submit("u1", b, 0.0) is Held.WAIT
    assert matcher.submit("u1", c, 0.0) is Held.WAIT
    assert matcher.submit("u1", routed("d"), 0.0) is Held.FULL
    assert matcher.waiting("u1") == 2
    step = matcher.client_message("u1", 0.1)
    assert (step.replied, step.send) == (a, b)
    step = matcher.client_message("u1", 0.2)
    assert (step.replied, step.send) == (b, c)
    step = matcher.client_message("u1", 0.3)
    assert (step.replied, step.send) == (c, None)


def test_the_deadline_of_the_command_in_flight_is_the_one_it_was_submitted_with():
    matcher = V1Matcher(max_waiting=2)
    a, b = routed("a"), routed("b")
    matcher.submit("u1", a, 10.0)
    matcher.submit("u1", b, 11.0)  # Waits; its deadline runs from now, not from when it is handed over.
    assert matcher.deadline("u1") == 10.0 + a.timeout_ms / 1000
    matcher.client_message("u1", 10.5)
    assert matcher.deadline("u1") == 11.0 + b.timeout_ms / 1000
    matcher.client_message("u1", 10.6)
    assert matcher.deadline("u1") is None


def test_a_message_with_nothing_in_flight_answers_nothing():
    matcher = V1Matcher(max_waiting=2)
    assert matcher.client_message("u1", 0.0).replied is None


def test_in_flight_command_past_its_deadline_lets_the_next_one_go():
    matcher = V1Matcher(max_waiting=5)
    a, b = routed("a", timeout_ms=100), routed("b", timeout_ms=1000)
    matcher.submit("u1", a, 0.0)
    matcher.submit("u1", b, 0.0)
    assert matcher.next_deadline() == 0.1
    assert matcher.expire(0.05) == {}
    advance = matcher.expire(0.1)["u1"]
    assert (advance.replied, advance.send) == (None, b)
    # The late answer to "a" is now taken as the answer to "b": the documented v1 limitation.
    assert matcher.client_message("u1", 0.2).replied == b


def test_waiting_commands_that_expired_unsent_are_skipped():
    matcher = V1Matcher(max_waiting=5)
    a, stale, fresh = routed("a", timeout_ms=1000), routed("s", timeout_ms=100), routed("f", timeout_ms=5000)
    matcher.submit("u1", a, 0.0)
    matcher.submit("u1", stale, 0.0)
    matcher.submit("u1", fresh, 0.0)
    advance = matcher.client_message("u1", 0.5)
    assert advance.replied == a
    assert advance.expired == (stale,)
    assert advance.send == fresh


def test_disconnect_returns_the_commands_never_handed_over():
    matcher = V1Matcher(max_waiting=5)
    a, b = routed("a"), routed("b")
    matcher.submit("u1", a, 0.0)
    matcher.submit("u1", b, 0.0)
    assert matcher.disconnect("u1") == [b]
    assert matcher.in_flight("u1") is None
    assert matcher.submit("u1", routed("c"), 1.0) is Held.SEND


def test_clients_have_independent_lines():
    matcher = V1Matcher(max_waiting=0)
    assert matcher.submit("u1", routed("a"), 0.0) is Held.SEND
    assert matcher.submit("u2", routed("b"), 0.0) is Held.SEND
    assert matcher.submit("u1", routed("c"), 0.0) is Held.FULL


# --- OfflineQueue -------------------------------------------------------------------------------


def test_queued_commands_come_out_in_order_once():
    queue = OfflineQueue(max_per_target=10, remember_seconds=60)
    a, b = routed("a"), routed("b")
    assert queue.enqueue("u1", a, 0.0) is Enqueued.QUEUED
    assert queue.enqueue("u1", b, 0.0) is Enqueued.QUEUED
    assert queue.take("u1", 0.5) == [a, b]
    assert queue.take("u1", 0.5) == []


def test_repeated_controller_and_id_is_never_delivered_twice():
    queue = OfflineQueue(max_per_target=10, remember_seconds=60)
    a = routed("a")
    assert queue.enqueue("u1", a, 0.0) is Enqueued.QUEUED
    assert queue.enqueue("u1", a, 0.1) is Enqueued.ALREADY_QUEUED
    assert queue.take("u1", 0.2) == [a]
    assert queue.enqueue("u1", a, 0.3) is Enqueued.ALREADY_DELIVERED
    assert queue.take("u1", 0.4) == []
    # Remembered beyond the command's own lifetime, for remember_seconds after delivery.
    assert queue.enqueue("u1", a, 50.0) is Enqueued.ALREADY_DELIVERED
    assert queue.enqueue("u1", a, 61.0) is Enqueued.QUEUED


def test_same_id_from_another_controller_is_another_command():
    queue = OfflineQueue(max_per_target=10, remember_seconds=60)
    assert queue.enqueue("u1", routed(1, controller="A"), 0.0) is Enqueued.QUEUED
    assert queue.enqueue("u1", routed(1, controller="B"), 0.0) is Enqueued.QUEUED


def test_queue_is_bounded_per_target():
    queue = OfflineQueue(max_per_target=2, remember_seconds=60)
    assert queue.enqueue("u1", routed(1), 0.0) is Enqueued.QUEUED
    assert queue.enqueue("u1", routed(2), 0.0) is Enqueued.QUEUED
    assert queue.enqueue("u1", routed(3), 0.0) is Enqueued.FULL
    assert queue.enqueue("u2", routed(3), 0.0) is Enqueued.QUEUED
    assert queue.enqueue("u1", routed(3), 0.0) is Enqueued.ALREADY_QUEUED  # it is queued, for u2


def test_expired_commands_are_not_delivered_and_a_later_repeat_may_queue_again():
    queue = OfflineQueue(max_per_target=10, remember_seconds=60)
    short, long_ = routed("s", timeout_ms=100), routed("l", timeout_ms=10_000)
    queue.enqueue("u1", long_, 0.0)
    queue.enqueue("u1", short, 0.0)
    assert queue.expire(0.2) == [short]  # expires although it is behind a longer-lived one
    assert len(queue) == 1
    assert queue.take("u1", 0.3) == [long_]
    assert queue.enqueue("u1", short, 1.0) is Enqueued.QUEUED  # it was never delivered


def test_take_skips_expired_commands_even_without_a_sweep():
    queue = OfflineQueue(max_per_target=10, remember_seconds=60)
    a, b = routed("a", timeout_ms=100), routed("b", timeout_ms=5000)
    queue.enqueue("u1", a, 0.0)
    queue.enqueue("u1", b, 0.0)
    assert queue.take("u1", 1.0) == [b]


def test_a_command_taken_but_never_handed_over_can_be_queued_again_once():
    queue = OfflineQueue(max_per_target=10, remember_seconds=60)
    a = routed("a")
    assert queue.enqueue("u1", a, 0.0) is Enqueued.QUEUED
    assert queue.take("u1", 0.1) == [a]
    assert queue.enqueue("u1", a, 0.2) is Enqueued.ALREADY_DELIVERED  # a repeat: never again
    assert queue.enqueue("u1", a, 0.2, requeue=True) is Enqueued.QUEUED  # its client left before it got it
    assert queue.enqueue("u1", a, 0.3, requeue=True) is Enqueued.ALREADY_QUEUED  # still one copy
    assert queue.take("u1", 0.4) == [a]
