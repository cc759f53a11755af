"""The Redis audit trail: shared by every instance, bounded, newest first, filterable by action."""

from __future__ import annotations

from redis.asyncio import Redis

from appliance.audit import AuditEvent, RedisAuditLog


async def test_redis_audit_log_is_shared_bounded_and_newest_first(redis_server):
    await redis_server.acommand("DEL", "wsb:audit")
    writer_redis, reader_redis = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    try:
        writer = RedisAuditLog(writer_redis, capacity=5)
        for i in range(7):
            action = "token.rotate" if i % 2 else "login"
            await writer.record(AuditEvent(action, "ADMIN_TOKEN", "10.0.0.1", f"t{i}", {"version": i}))
        reader = RedisAuditLog(reader_redis, capacity=5)  # another instance
        events = await reader.recent(100)
        assert [e.target for e in events] == ["t6", "t5", "t4", "t3", "t2"]
        assert events[1] == AuditEvent("token.rotate", "ADMIN_TOKEN", "10.0.0.1", "t5", {"version": 5}, events[1].at)
        assert [e.target for e in await reader.recent(10, "token.")] == ["t5", "t3"]
        assert [e.target for e in await reader.recent(1)] == ["t6"]
        assert await writer_redis.llen("wsb:audit") == 5
    finally:
        await writer_redis.aclose()
        await reader_redis.aclose()
