"""The router's Batch stream: checked once, grouped by owner, forwarded by callback.

A router (the real ``RouterService`` and ``Routes``) in front of two in-process fake
shards, all on 127.0.0.1; the caller speaks the raw ``Inventory.Batch`` stream to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import PARTITION_COUNT, partition_of
from shard_router.common import errors
from shard_router.ring import Ring
from shard_router.router.routing import Routes
from shard_router.router.service import RouterService
from tests.task_count import tasks_created

from .fake_shard import MERCHANT, FakeShard, fake_shard, key, reserve_request, serving

WAIT_S = 20.0
SHARD_IDS = ("shard-a", "shard-b")


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(WAIT_S):
            await scenario()

    asyncio.run(bounded())


@dataclass(frozen=True)
class Member:
    shard_id: str
    address: str


@dataclass
class Cluster:
    shards: dict[str, FakeShard]
    router: pb_grpc.InventoryStub

    def owner_of(self, location: str) -> FakeShard:
        ring = Ring(SHARD_IDS, partition_count=PARTITION_COUNT)
        return self.shards[ring.owner_of(partition_of(MERCHANT, location))]

    async def batch(self, *requests: pb.BatchRequest) -> dict[int, pb.BatchItemResult]:
        """Send the requests on one Batch stream; every result, by id (each exactly once)."""
        expected = sum(len(request.items) for request in requests)
        call = self.router.Batch()
        for request in requests:
            await call.write(request)
        results: list[pb.BatchItemResult] = []
        while len(results) < expected:
            response = await call.read()
            assert response is not grpc.aio.EOF
            results.extend(response.results)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        by_id = {result.id: result for result in results}
        assert len(by_id) == len(results), "an item was answered twice"
        return by_id


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    shards = {shard_id: fake_shard(name=shard_id) for shard_id in SHARD_IDS}
    async with (
        serving(shards["shard-a"]) as address_a,
        serving(shards["shard-b"]) as address_b,
    ):
        members = [Member("shard-a", address_a), Member("shard-b", address_b)]

        async def read_members() -> list[Member]:
            return members

        routes = Routes(read_members, PARTITION_COUNT)
        await routes.refresh(force=True)
        try:
            async with (
                serving(RouterService(routes)) as router_address,
                grpc.aio.insecure_channel(router_address) as channel,
            ):
                yield Cluster(shards, pb_grpc.InventoryStub(channel))
        finally:
            await routes.close()


def reserves(locations: Sequence[str], sku: str = "rice", first_id: int = 1) -> pb.BatchRequest:
    request = pb.BatchRequest()
    for offset, location in enumerate(locations):
        item_id = first_id + offset
        request.items.add(id=item_id, timeout_ms=10_000).reserve.CopyFrom(
            reserve_request(f"k-{item_id}", location, sku)
        )
    return request


LOCATIONS = [f"loc-{n}" for n in range(40)]


def test_a_requests_items_reach_each_owner_in_one_request_as_the_caller_sent_them() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            request = reserves(LOCATIONS)
            results = await c.batch(request)
            assert sorted(results) == list(range(1, len(LOCATIONS) + 1))
            for item_id, result in results.items():
                assert result.reserve.reservation.reservation_id == f"k-{item_id}"
            for shard in c.shards.values():
                owned = [i for i, x in enumerate(LOCATIONS) if c.owner_of(x) is shard]
                assert owned, "both shards own some of the locations"
                assert len(shard.requests) == 1, "one request per owner, not one per item"
                seen = [item.reserve.SerializeToString() for item in shard.items_seen]
                assert seen == [request.items[i].reserve.SerializeToString() for i in owned]

    run(scenario)


def test_a_malformed_item_is_refused_by_the_router_without_a_hop_the_others_answered() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            request = reserves(["loc-1", "loc-2"])
            request.items.add(id=3, reserve=pb.ReserveRequest(idempotency_key="no-lines"))
            request.items.add(id=4)  # no call at all
            results = await c.batch(request)
            for item_id in (3, 4):
                assert errors.reason_of(results[item_id].error) == "INVALID_ARGUMENT"
                assert errors.answer_class_of(results[item_id].error) is errors.AnswerClass.FINAL
            assert {results[i].WhichOneof("result") for i in (1, 2)} == {"reserve"}
            seen = [
                item.reserve.idempotency_key for s in c.shards.values() for item in s.items_seen
            ]
            assert sorted(seen) == ["k-1", "k-2"]

    run(scenario)


def test_an_item_that_names_its_owner_is_checked_there_alone() -> None:
    """Validated once, at the owner: the router reads only what routes the call, so a
    request it can route reaches its owner as sent, malformed or not (the owner's check
    gives the precise answer; tests/e2e/test_shard_process.py holds that answer)."""

    async def scenario() -> None:
        async with cluster() as c:
            request = reserves(["loc-1"])
            malformed = reserve_request("zero-quantity", "loc-2")
            malformed.lines[0].quantity = 0
            malformed.ttl_s = 1  # below the 30 s bound
            request.items.add(id=2, timeout_ms=10_000).reserve.CopyFrom(malformed)
            await c.batch(request)
            [seen] = c.owner_of("loc-2").items_seen
            assert seen.reserve.SerializeToString() == malformed.SerializeToString()

    run(scenario)


def test_an_item_answered_unavailable_is_retried_and_answered_once() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            results = await c.batch(reserves(["loc-1", "loc-2", "loc-3"], sku="moved-x"))
            assert {r.WhichOneof("result") for r in results.values()} == {"reserve"}
            for item_id, location in enumerate(["loc-1", "loc-2", "loc-3"], start=1):
                assert c.owner_of(location).attempts[f"k-{item_id}"] == 2

    run(scenario)


def test_only_the_propagated_metadata_travels_with_an_item() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            request = reserves(["loc-1"])
            request.items[0].metadata.update({"x-request-id": "req-1", "cookie": "secret"})
            await c.batch(request)
            [item] = c.owner_of("loc-1").items_seen
            assert dict(item.metadata) == {"x-request-id": "req-1"}

    run(scenario)


def test_reads_and_mutations_of_one_request_are_all_answered() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            request = reserves(["loc-1", "loc-2"])
            keys = [key(location) for location in LOCATIONS[:6]]
            request.items.add(id=9, get_availability=pb.GetAvailabilityRequest(keys=keys))
            results = await c.batch(request)
            assert [level.key for level in results[9].get_availability.levels] == keys
            assert {results[i].WhichOneof("result") for i in (1, 2)} == {"reserve"}

    run(scenario)


def test_routed_items_in_flight_cost_the_router_no_task_each() -> None:
    repeats = 8
    items_count = len(LOCATIONS) * repeats

    async def scenario() -> None:
        async with cluster() as c:
            await c.batch(reserves(["loc-1"], first_id=1000))  # streams opened
            with tasks_created() as created:
                await c.batch(reserves(LOCATIONS * repeats))
        # The fake shards run a task per item (serve_stream); the router must not.
        shard_tasks = created.count("tasks_per_item.<locals>.run")
        assert shard_tasks == items_count
        router_tasks = [name for name in created if name != "tasks_per_item.<locals>.run"]
        assert len(router_tasks) < 20, router_tasks

    run(scenario)


def test_a_unary_call_through_the_router_carries_its_metadata() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            answer = await c.router.Reserve(
                reserve_request("unary-1", "loc-1"),
                metadata=(("x-request-id", "req-9"), ("cookie", "secret")),
                timeout=WAIT_S,
            )
            assert answer.reservation.reservation_id == "unary-1"
            [item] = c.owner_of("loc-1").items_seen
            assert dict(item.metadata) == {"x-request-id": "req-9"}

    run(scenario)
