"""Live availability end to end: shards publish to Redis, the router streams to watchers.

Real processes (2 shards, 1 router), real PostgreSQL, a real Redis the tests can kill -9.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from inventory.v1 import events_pb2
from inventory.v1 import events_pb2_grpc as events_grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from persistence.embedded import EmbeddedRedis
from tests.conftest import Cluster, start_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

MERCHANT = "m-live"
LOCATIONS = ["store-1", "store-2", "store-3"]
SKUS = [f"sku-{i}" for i in range(8)]
KEYS = [(loc, sku) for loc in LOCATIONS for sku in SKUS]
CALL_TIMEOUT_S = 20.0
# How long a watcher may take to catch up with the final state once writes stop.
CONVERGE_TIMEOUT_S = 45.0


def key(location: str, sku: str) -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=MERCHANT, sku_id=sku, location_id=location)


@dataclass
class Live:
    redis: EmbeddedRedis
    redis_dir: Path
    redis_port: int
    cluster: Cluster

    def kill_redis(self) -> None:
        self.redis.kill()

    def restart_redis(self) -> None:
        self.redis = EmbeddedRedis()
        self.redis.start(self.redis_dir, port=self.redis_port)


@pytest.fixture
def live(database_url: str, tmp_path: Path) -> Iterator[Live]:
    redis_dir = Path(tempfile.mkdtemp(prefix="inv-live-redis-"))
    redis = EmbeddedRedis()
    url = redis.start(redis_dir)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    cluster = start_cluster(database_url, tmp_path, shards=2, redis_url=url)
    handle = Live(redis, redis_dir, port, cluster)
    try:
        yield handle
    finally:
        cluster.stop()
        handle.redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)


@dataclass
class Watcher:
    """Reads a Watch stream, remembering the latest version per key and the resume token."""

    versions: dict[tuple[str, str], int] = field(default_factory=dict)
    token: str = ""
    backwards: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    resyncs: int = 0

    def see(self, location: str, sku: str, version: int) -> None:
        seen = self.versions.get((location, sku), 0)
        if version < seen:
            self.backwards.append(f"{location}/{sku}: {seen} -> {version}")
        self.versions[(location, sku)] = max(seen, version)

    def take(self, message: events_pb2.WatchEvent) -> None:
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            if message.snapshot.reason:
                self.snapshots.append(message.snapshot.reason)
            for level in message.snapshot.levels:
                self.see(level.key.location_id, level.key.sku_id, level.version)
        elif kind == "change":
            change = message.change
            self.see(change.key.location_id, change.key.sku_id, change.version)
        elif kind == "resync":
            self.resyncs += 1
        if message.resume_token:
            self.token = message.resume_token

    async def follow(self, address: str, stop: asyncio.Event) -> None:
        """Stream until ``stop`` is set, then disconnect."""
        async with grpc.aio.insecure_channel(address) as channel:
            stub = events_grpc.AvailabilityStreamStub(channel)
            call = stub.Watch(
                events_pb2.WatchRequest(merchant_id=MERCHANT, resume_token=self.token)
            )

            async def read() -> None:
                async for message in call:
                    self.take(message)

            reader = asyncio.ensure_future(read())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            call.cancel()
            for task in (reader, stopper):
                task.cancel()
            await asyncio.gather(reader, stopper, return_exceptions=True)


async def seed(stub: pb_grpc.InventoryStub) -> None:
    for location, sku in KEYS:
        await stub.SetStock(
            pb.SetStockRequest(
                key=key(location, sku), on_hand=100_000, idempotency_key=f"seed-{location}-{sku}"
            ),
            timeout=CALL_TIMEOUT_S,
        )


async def write_load(
    stub: pb_grpc.InventoryStub, seconds: float, rng: random.Random, tag: str
) -> tuple[int, list[str]]:
    """Reservations over the keys for ``seconds``; returns (acknowledged, errors)."""
    stop_at = time.monotonic() + seconds
    done = 0
    failures: list[str] = []
    counter = iter(range(10**6))

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            location, sku = rng.choice(KEYS)
            request = pb.ReserveRequest(
                lines=[pb.ReservationLine(key=key(location, sku), quantity=1)],
                idempotency_key=f"{tag}-{next(counter)}",
            )
            try:
                await stub.Reserve(request, timeout=CALL_TIMEOUT_S)
                done += 1
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")

    await asyncio.gather(*(worker() for _ in range(8)))
    return done, failures


async def server_versions(
    stub: pb_grpc.InventoryStub, consistency: int
) -> dict[tuple[str, str], int]:
    answer = await stub.GetAvailability(
        pb.GetAvailabilityRequest(
            keys=[key(loc, sku) for loc, sku in KEYS], consistency=consistency
        ),
        timeout=CALL_TIMEOUT_S,
    )
    return {(lv.key.location_id, lv.key.sku_id): lv.version for lv in answer.levels}


async def until_converged(watcher: Watcher, truth: dict[tuple[str, str], int]) -> None:
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    while watcher.versions != truth:
        assert time.monotonic() < deadline, {
            k: (watcher.versions.get(k), v)
            for k, v in truth.items()
            if watcher.versions.get(k) != v
        }
        await asyncio.sleep(0.1)


def test_watcher_that_disconnects_mid_load_resumes_and_ends_at_the_server_state(live: Live) -> None:
    seed_value = random.randrange(2**32)
    print(f"seed={seed_value}")
    rng = random.Random(seed_value)

    async def run() -> None:
        address = live.cluster.router.address
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            await seed(stub)
            watcher = Watcher()
            first, second = asyncio.Event(), asyncio.Event()
            following = asyncio.ensure_future(watcher.follow(address, first))
            load = asyncio.ensure_future(write_load(stub, 6.0, rng, "resume"))
            await asyncio.sleep(2.0)
            first.set()  # disconnect mid-load
            await following
            assert watcher.token, "no resume token was received before the disconnect"
            await asyncio.sleep(1.5)  # changes happen while it is away
            following = asyncio.ensure_future(watcher.follow(address, second))
            done, failures = await load
            assert done > 100 and not failures, failures[:5]
            truth = await server_versions(stub, pb.CONSISTENCY_STRONG)
            await until_converged(watcher, truth)
            second.set()
            await following
            assert not watcher.backwards, watcher.backwards[:5]

    asyncio.run(run())


def test_redis_killed_during_writes_costs_no_reservation_and_everything_converges(
    live: Live,
) -> None:
    seed_value = random.randrange(2**32)
    print(f"seed={seed_value}")
    rng = random.Random(seed_value)

    async def run() -> None:
        address = live.cluster.router.address
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            await seed(stub)
            watcher = Watcher()
            stop = asyncio.Event()
            following = asyncio.ensure_future(watcher.follow(address, stop))
            load = asyncio.ensure_future(write_load(stub, 7.0, rng, "outage"))
            await asyncio.sleep(1.5)
            await asyncio.to_thread(live.kill_redis)
            await asyncio.sleep(2.5)  # writes go on with Redis down
            await asyncio.to_thread(live.restart_redis)
            done, failures = await load
            assert done > 100 and not failures, failures[:5]  # the write path never blocked
            truth = await server_versions(stub, pb.CONSISTENCY_STRONG)
            deadline = time.monotonic() + CONVERGE_TIMEOUT_S
            while await server_versions(stub, pb.CONSISTENCY_EVENTUAL) != truth:
                assert time.monotonic() < deadline, "the read view did not converge"
                await asyncio.sleep(0.2)
            await until_converged(watcher, truth)
            stop.set()
            await following
            assert not watcher.backwards, watcher.backwards[:5]

    asyncio.run(run())


def test_slow_watcher_does_not_grow_router_memory_or_slow_others(live: Live) -> None:
    seed_value = random.randrange(2**32)
    print(f"seed={seed_value}")
    rng = random.Random(seed_value)
    router = psutil.Process(live.cluster.router.process.pid)  # type: ignore[union-attr]

    async def run() -> None:
        address = live.cluster.router.address
        async with (
            grpc.aio.insecure_channel(address) as channel,
            grpc.aio.insecure_channel(address) as slow_channel,
        ):
            stub = pb_grpc.InventoryStub(channel)
            await seed(stub)
            slow = events_grpc.AvailabilityStreamStub(slow_channel).Watch(
                events_pb2.WatchRequest(merchant_id=MERCHANT)
            )
            await slow.read()  # connected; it reads nothing more while the load runs
            rss_before = router.memory_info().rss
            fast = Watcher()
            stop = asyncio.Event()
            following = asyncio.ensure_future(fast.follow(address, stop))
            done, failures = await write_load(stub, 6.0, rng, "slow")
            assert done > 100 and not failures, failures[:5]
            truth = await server_versions(stub, pb.CONSISTENCY_STRONG)
            await until_converged(fast, truth)  # the fast watcher was not held back
            growth_mib = (router.memory_info().rss - rss_before) / 2**20
            # Bounded per-subscriber buffers: a stalled reader costs at most its bounds.
            assert growth_mib < 64, f"router grew {growth_mib:.1f} MiB with a stalled watcher"
            stop.set()
            await following
            slow.cancel()

    asyncio.run(run())
