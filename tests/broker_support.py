"""Drive brokers at their API: an inbox with the relay's answers, instances, outcomes."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis_topologies import MASTER_NAME, ClusterGroup, SentinelGroup
from support import eventually

from appliance.brokers.base import Broker, Owner
from appliance.brokers.memory import MemoryBroker
from appliance.brokers.redis import RedisBroker, RedisTarget
from appliance.brokers.redis.keys import Keys
from appliance.core.protocol import ErrorCode, Role
from appliance.core.requests import Routed

__all__ = [
    "BACKENDS",
    "CLIENT",
    "CONTROLLER",
    "Cluster",
    "Inbox",
    "Node",
    "Outcome",
    "backend",
    "cluster_group",
    "new_id",
    "sentinel_group",
    "until",
]

#: Every broker backend the contract runs on.
BACKENDS = ["memory", "redis", "sentinel", "cluster"]


@pytest.fixture(scope="session")
def sentinel_group() -> Iterator[SentinelGroup]:
    """A primary, a replica and three Sentinels for the session; tests that kill one make their own."""
    group = SentinelGroup().start()
    yield group
    group.stop()


@pytest.fixture(scope="session")
def cluster_group() -> Iterator[ClusterGroup]:
    """A Redis Cluster (three primaries, three replicas) for the session; tests that kill a node make their own."""
    group = ClusterGroup().start()
    yield group
    group.stop()


def backend(request: pytest.FixtureRequest, kind: str) -> tuple[str | RedisTarget | None, str | None]:
    """(what a RedisBroker connects to, a plain URL of the data node for direct reads) of ``kind``."""
    if kind == "memory":
        return None, None
    if kind == "redis":
        url = request.getfixturevalue("redis_server").url
        return url, url
    if kind == "sentinel":
        group = request.getfixturevalue("sentinel_group")
        sentinels = tuple(("127.0.0.1", s.port) for s in group.sentinels)
        return RedisTarget(sentinels=sentinels, sentinel_master=MASTER_NAME), group.master().url
    if kind == "cluster":
        url = request.getfixturevalue("cluster_group").url
        return RedisTarget(url=url, cluster=True), url
    raise ValueError(kind)


CLIENT, CONTROLLER = Role.CLIENT, Role.CONTROLLER


class Inbox:
    """Local connections of one instance, with the answers the relay gives."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.roles: dict[str, Role] = {}
        self.closing: set[str] = set()
        self.received: list[tuple[str, str]] = []
        self.senders: list[str] = []  # the controller each received text came from
        self.routed: list[tuple[str, Routed]] = []
        self.events: list[bytes] = []
        self.fanned: list[bytes] = []
        self.arrivals: list[str] = []  # texts and routed messages in arrival order
        self.controller_frames: list[str] = []
        self.replaced_owners: list[tuple[str, Owner]] = []

    def connect(self, client_id: str, role: Role) -> None:
        self.roles[client_id] = role

    def deliver(self, client_id: str, text: str, sender: str = "") -> ErrorCode | None:
        failure = self._refusal(client_id)
        if failure is None:
            self.received.append((client_id, text))
            self.senders.append(sender)
            self.arrivals.append(text)
        return failure

    def deliver_routed(self, client_id: str, routed: Routed) -> ErrorCode | None:
        failure = self._refusal(client_id)
        if failure is None:
            self.routed.append((client_id, routed))
            self.arrivals.append(routed.message)
        return failure

    def instance_event(self, payload: bytes) -> None:
        self.events.append(payload)

    def fan_in(self, payload: bytes) -> None:
        self.fanned.append(payload)

    def _refusal(self, client_id: str) -> ErrorCode | None:
        role = self.roles.get(client_id)
        if role is None:
            return ErrorCode.TARGET_OFFLINE
        if role is CONTROLLER:
            return ErrorCode.TARGET_NOT_CLIENT
        if client_id in self.closing:
            return ErrorCode.DELIVERY_FAILED
        return None

    def deliver_to_controllers(self, frame: str) -> None:
        self.controller_frames.append(frame)

    def replaced(self, client_id: str, owner: Owner) -> None:
        self.replaced_owners.append((client_id, owner))

    def presence_records(self) -> list[dict[str, Any]]:
        return [r for r in map(self.presence_record, self.roles) if r is not None]

    def presence_summary(self) -> dict[str, Any]:
        records = self.presence_records()
        clients = sum(1 for r in records if r["role"] == "client")
        return {
            "instance": self.instance,
            "epoch": "test",
            "membership": zlib.crc32(",".join(sorted(self.roles)).encode()),
            "connections": len(records),
            "clients": clients,
            "controllers": len(records) - clients,
            "messages_in": 0,
            "messages_out": 0,
        }

    def presence_record(self, client_id: str) -> dict[str, Any] | None:
        role = self.roles.get(client_id)
        if role is None:
            return None
        return {"id": client_id, "role": role.value, "instance": self.instance}


class Node:
    def __init__(self, name: str, broker: Broker, inbox: Inbox) -> None:
        self.name, self.broker, self.inbox = name, broker, inbox
        self.keys = iter(uuid.uuid4().hex[:16] for _ in range(1000))

    async def claim(self, client_id: str, role: Role = CLIENT, *, reject: bool = False):
        claim = await self.broker.claim(client_id, self.name, next(self.keys), role, reject)
        if claim.accepted:
            self.inbox.connect(client_id, role)
        return claim

    async def release(self, client_id: str, owner: Owner) -> None:
        self.inbox.roles.pop(client_id, None)
        await self.broker.release(client_id, owner)


class Outcome:
    """Collects the calls of one ``on_result``: there must be exactly one."""

    def __init__(self) -> None:
        self.calls: list[tuple[ErrorCode | None, str]] = []

    def __call__(self, code: ErrorCode | None, detail: str) -> None:
        self.calls.append((code, detail))

    async def result(self) -> ErrorCode | None:
        async def arrived() -> bool:
            return bool(self.calls)

        await eventually(arrived, 15, "the outcome of a send")
        await asyncio.sleep(0.2)  # A second outcome would come right behind the first.
        assert len(self.calls) == 1, f"expected exactly one outcome, got {self.calls}"
        return self.calls[0][0]


class Cluster:
    """Instances of one backend: ``redis_url`` is a plain URL of its (current) data node, for direct reads."""

    def __init__(
        self, kind: str, target: str | RedisTarget | None, *, redis_url: str | None = None, **options: Any
    ) -> None:
        self.kind, self.target, self.options = kind, target, options
        self.redis_url = redis_url or (target if isinstance(target, str) else None)
        self.nodes: list[Node] = []
        self._memory: Node | None = None
        self.keys = Keys(tagged=kind == "cluster")

    def raw(self) -> Redis:
        """A plain client of the backend's data (a cluster client on a Cluster), for direct reads and writes."""
        assert self.redis_url is not None
        return RedisTarget(url=self.redis_url, cluster=self.kind == "cluster").client(max_connections=4)

    @classmethod
    def of(cls, request: pytest.FixtureRequest, kind: str, **options: Any) -> Cluster:
        target, url = backend(request, kind)
        return cls(kind, target, redis_url=url, **options)

    async def node(self, name: str, url: str | None = None) -> Node:
        if self.kind == "memory":
            if self._memory is None:
                inbox = Inbox("memory")
                broker = MemoryBroker(
                    **{
                        k: v
                        for k, v in self.options.items()
                        if k.startswith(("queue_", "history_", "records_", "idempotency_", "key_"))
                    }
                )
                await broker.start(inbox)
                self._memory = Node("memory", broker, inbox)
            return self._memory
        instance = f"{name}-{uuid.uuid4().hex[:6]}"
        inbox = Inbox(instance)
        target = url or self.target
        assert target is not None
        broker = RedisBroker(target, instance=instance, **self.options)
        await broker.start(inbox)
        node = Node(instance, broker, inbox)
        self.nodes.append(node)
        return node

    async def stop(self) -> None:
        for node in [*self.nodes, *([self._memory] if self._memory else [])]:
            await node.broker.stop()


def new_id(prefix: str = "id") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def until(condition, within: float = 10.0, message: str = "condition"):
    async def check():
        return condition()

    return await eventually(check, within, message)
