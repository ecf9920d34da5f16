"""The Batch stream's bound, and the router's honest answers, in one process on 127.0.0.1.

1. ``serve_stream`` holds at most ``items_held_max`` items (running, or answered and not yet
   written): a caller that sends many items and never reads its responses stops being read,
   and the server's results never pile up past the bound. Driven directly and over gRPC.
   ``serve_items`` ends only when every item read has been answered, however it was.
2. A router in front of an in-process shard (the real shard calls and servicer over an owner
   seam that applies commands to pure partitions at once, with faults injected per
   idempotency key): a ReserveOrder whose leg's outcome is unknown at first resolves it
   before compensating, so nothing stays held; one that stays unknown answers
   ORDER_OUTCOME_UNKNOWN, and its retry with the same key settles it. The router's answer
   after retries is retryable only when every attempt was known not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import grpc
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import (
    PARTITION_COUNT,
    ClientCommand,
    InventoryKey,
    Outcome,
    Partition,
    Reservation,
    StockLevel,
    orders,
)
from shard_router.common import batching, errors
from shard_router.common.calls import Refusal
from shard_router.common.servicer import CallsServicer
from shard_router.router.routing import Routes
from shard_router.router.service import RouterCalls, RouterService
from shard_router.shard.owner import FlushFailed, NotOwner, Overloaded
from shard_router.shard.service import InventoryService

WAIT_S = 20.0
T0_MS = 1_700_000_000_000
MERCHANT = "m-1"
FINAL = errors.AnswerClass.FINAL
RETRYABLE = errors.AnswerClass.RETRYABLE
UNKNOWN = errors.AnswerClass.OUTCOME_UNKNOWN


def run(scenario: Any) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(WAIT_S):
            await scenario()

    asyncio.run(bounded())


# ----------------------------------------------------------- 1. the stream's bound


@dataclass
class CountingCalls:
    """Answers every Reserve at once and counts what it answered."""

    answered: int = 0

    async def reserve(
        self, request: pb.ReserveRequest, deadline: float | None
    ) -> pb.ReserveResponse:
        self.answered += 1
        return pb.ReserveResponse(
            reservation=pb.Reservation(reservation_id=request.idempotency_key)
        )


def batch(first_id: int, count: int) -> pb.BatchRequest:
    request = pb.BatchRequest()
    for item_id in range(first_id, first_id + count):
        request.items.add(id=item_id).reserve.idempotency_key = f"k-{item_id}"
    return request


def test_a_caller_that_stops_reading_is_held_at_the_bound_and_resumes_when_it_reads() -> None:
    bound = 2 * batching.BATCH_ITEMS_MAX
    requests_total, items_per_request = 40, batching.BATCH_ITEMS_MAX  # 40,000 items offered

    async def scenario() -> None:
        calls = CountingCalls()
        dispatch = cast("dict[str, batching.Call]", {"reserve": calls.reserve})
        read = 0

        async def requests() -> AsyncIterator[pb.BatchRequest]:
            nonlocal read
            for n in range(requests_total):
                read += 1
                yield batch(n * items_per_request, items_per_request)

        stream = batching.serve_stream(requests(), dispatch, lambda _: None, items_held_max=bound)
        first = await anext(stream)  # then the caller stops reading
        for _ in range(50):
            await asyncio.sleep(0.01)  # everything the server would do meanwhile
        written = len(first.results)
        assert calls.answered - written <= bound, "results held past the bound"
        assert calls.answered <= bound + written
        assert read <= bound // items_per_request + 2, "the server kept reading requests"
        # The caller reads again: every item is answered, once.
        ids = [r.id for r in first.results]
        async for response in stream:
            ids.extend(r.id for r in response.results)
        assert sorted(ids) == list(range(requests_total * items_per_request))
        assert calls.answered == requests_total * items_per_request

    run(scenario)


class CountedServicer(CallsServicer):
    """The real servicer; counts the requests its Batch reads and the results it writes."""

    def __init__(self, calls: object) -> None:
        super().__init__(calls)
        self.requests_read = 0
        self.results_written = 0

    async def Batch(  # noqa: N802
        self, requests: AsyncIterator[pb.BatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BatchResponse]:
        async def counted() -> AsyncIterator[pb.BatchRequest]:
            async for request in requests:
                self.requests_read += 1
                yield request

        async for response in super().Batch(counted(), context):
            self.results_written += len(response.results)
            yield response


def test_over_grpc_a_caller_that_never_reads_its_responses_does_not_grow_the_server() -> None:
    bound = batching.STREAM_ITEMS_HELD_MAX

    async def scenario() -> None:
        calls = CountingCalls()
        servicer = CountedServicer(calls)
        # Without BDP probing the receive windows stay at their initial 64 KiB, so the
        # back-pressure reaches the caller's writes within a few thousand items.
        options = [("grpc.http2.bdp_probe", 0)]
        async with (
            serving(servicer, options) as address,
            grpc.aio.insecure_channel(address, options=options) as channel,
        ):
            call = pb_grpc.InventoryStub(channel).Batch()
            sent = 0
            # Write until the server stops reading and flow control stops the writes.
            with contextlib.suppress(TimeoutError):
                for n in range(100):
                    async with asyncio.timeout(1.0):
                        await call.write(batch(n * 1000, 1000))
                    sent += 1000
            await asyncio.sleep(0.5)
            held = calls.answered - servicer.results_written
            assert held <= bound, held
            assert servicer.requests_read * 1000 <= bound + servicer.results_written + 1000
            assert sent < 100_000, "the writes never met back-pressure"
            call.cancel()

    run(scenario)


def test_a_request_over_batch_items_max_is_refused_item_by_item_within_the_bound() -> None:
    async def scenario() -> None:
        calls = CountingCalls()
        dispatch = cast("dict[str, batching.Call]", {"reserve": calls.reserve})

        async def requests() -> AsyncIterator[pb.BatchRequest]:
            yield batch(0, 2500)

        results = [
            result
            async for response in batching.serve_stream(
                requests(), dispatch, lambda _: None, items_held_max=batching.BATCH_ITEMS_MAX
            )
            for result in response.results
        ]
        assert sorted(r.id for r in results) == list(range(2500))
        assert calls.answered == 0
        assert {errors.reason_of(r.error) for r in results} == {"INVALID_ARGUMENT"}
        assert all(errors.answer_class_of(r.error) is FINAL for r in results)

    run(scenario)


def test_a_bug_in_a_call_is_answered_internal_unknown_for_a_mutation_retryable_for_a_read() -> None:
    async def broken(request: object, deadline: float | None) -> None:
        raise RuntimeError("a bug")

    async def scenario() -> None:
        dispatch = dict.fromkeys(batching.CALL_FIELDS, broken)
        mutation = pb.BatchItem(id=1, reserve=pb.ReserveRequest())
        read = pb.BatchItem(id=2, get_reservation=pb.GetReservationRequest())
        for item, expected in ((mutation, UNKNOWN), (read, RETRYABLE)):
            result = await batching.run_item(item, dispatch, lambda _: None)
            assert result.error.code == grpc.StatusCode.INTERNAL.value[0]
            assert errors.answer_class_of(result.error) is expected

    run(scenario)


def test_a_handler_may_answer_by_callback_after_the_caller_closed_and_the_stream_waits() -> None:
    """``serve_items``: items answered at once, later from a plain callback, or from a task
    started after the request (the task group lives until every item is answered)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        later: list[pb.BatchItem] = []

        def handler(
            items: Sequence[pb.BatchItem],
            received_at: float,
            answer: batching.Answer,
            group: asyncio.TaskGroup,
        ) -> None:
            for item in items:
                if item.id % 3 == 0:
                    answer(pb.BatchItemResult(id=item.id))  # at once
                else:
                    later.append(item)

            def answer_the_rest() -> None:
                for item in later:
                    if item.id % 3 == 1:
                        answer(pb.BatchItemResult(id=item.id))  # by callback
                    else:
                        group.create_task(answer_after_a_while(item, answer))  # by a task

            loop.call_later(0.05, answer_the_rest)

        async def answer_after_a_while(item: pb.BatchItem, answer: batching.Answer) -> None:
            await asyncio.sleep(0.05)
            answer(pb.BatchItemResult(id=item.id))

        async def requests() -> AsyncIterator[pb.BatchRequest]:
            yield batch(0, 30)  # and the caller closes its side at once

        answered = [
            result.id
            async for response in batching.serve_items(requests(), handler)
            for result in response.results
        ]
        assert sorted(answered) == list(range(30))

    run(scenario)


@contextlib.asynccontextmanager
async def serving(servicer: object, options: Sequence[tuple[str, Any]] = ()) -> AsyncIterator[str]:
    server = grpc.aio.server(options=list(options))
    pb_grpc.add_InventoryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


# --------------------------------------------- 2. a router over an in-process shard


@dataclass
class DirectOwner:
    """The owner seam of the shard's calls, without a loop or a store: a command applies to
    a pure partition at once, as if its flush committed. ``faults`` scripts, per idempotency
    key, what its successive attempts do:

        applied_then_bug      applied and durable, then the shard fails (INTERNAL: unknown)
        applied_then_unknown  applied and durable, but the flush's fate is unknown (FLUSH_FAILED)
        bug                   fails before applying (INTERNAL: unknown to the caller)
        flush_failed          not applied: its flush failed (FLUSH_FAILED: unknown to the caller)
        not_owner             not applied: the partition lives elsewhere (NOT_OWNER)
        overloaded            not applied: the queue was full (OVERLOADED)

    The last entry of a script repeats; an empty script means no fault.
    """

    cores: dict[int, Partition] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    submitted: set[asyncio.Future[None]] = field(default_factory=set)

    def core(self, partition: int) -> Partition:
        return self.cores.setdefault(partition, Partition(partition))

    async def mutate(
        self, partition: int, command: ClientCommand, deadline: float | None
    ) -> Outcome:
        key = command.idempotency_key
        self.attempts[key] += 1
        script = self.faults.get(key, [])
        fault = (script.pop(0) if len(script) > 1 else script[0]) if script else ""
        if fault == "not_owner":
            raise NotOwner(partition, recovering=False)
        if fault == "overloaded":
            raise Overloaded("request queue full (fake)")
        if fault == "flush_failed":
            raise FlushFailed("flush failed: connection reset (fake)")
        if fault == "bug":
            raise RuntimeError("a bug before applying (fake)")
        outcome = self.core(partition).apply(replace(command, now_ms=T0_MS)).outcome
        if fault == "applied_then_bug":
            raise RuntimeError("a bug after applying (fake)")
        if fault == "applied_then_unknown":
            raise FlushFailed("flush outcome unknown (fake)")
        return outcome

    def submit_mutation(
        self,
        partition: int,
        command: ClientCommand,
        deadline: float | None,
        done: Callable[[Outcome | Exception], None],
    ) -> None:
        """The Batch path's seam: ``mutate``, answered through ``done``."""

        async def answer() -> None:
            try:
                outcome = await self.mutate(partition, command, deadline)
            except Exception as error:
                done(error)
            else:
                done(outcome)

        task = asyncio.ensure_future(answer())
        self.submitted.add(task)
        task.add_done_callback(self.submitted.discard)

    async def levels(
        self, partition: int, keys: tuple[InventoryKey, ...], deadline: float | None
    ) -> tuple[StockLevel, ...]:
        return self.core(partition).levels(keys, T0_MS)

    async def reservation(
        self, partition: int, merchant_id: str, reservation_id: str, deadline: float | None
    ) -> Reservation | None:
        return self.core(partition).reservation(merchant_id, reservation_id, T0_MS)


@dataclass(frozen=True)
class Member:
    shard_id: str
    address: str


@dataclass
class Cluster:
    owner: DirectOwner
    router: RouterCalls
    shard_stub: pb_grpc.InventoryStub
    router_stub: pb_grpc.InventoryStub

    async def set_stock(self, location: str, on_hand: int) -> None:
        request = pb.SetStockRequest(
            key=key(location), on_hand=on_hand, idempotency_key=f"set-{location}"
        )
        await self.router_stub.SetStock(request, timeout=WAIT_S)

    async def reserved(self, locations: Iterable[str]) -> list[int]:
        request = pb.GetAvailabilityRequest(keys=[key(x) for x in locations])
        answer = await self.router_stub.GetAvailability(request, timeout=WAIT_S)
        return [level.reserved for level in answer.levels]


def key(location: str) -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=MERCHANT, sku_id="rice", location_id=location)


def leg(location: str, quantity: int) -> pb.ReserveRequest:
    return pb.ReserveRequest(lines=[pb.ReservationLine(key=key(location), quantity=quantity)])


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    """One shard (the real shard servicer over ``DirectOwner``) and a router over it."""
    owner = DirectOwner()
    async with serving(InventoryService(cast(Any, owner))) as shard_address:

        async def members() -> list[Member]:
            return [Member("shard-1", shard_address)]

        routes = Routes(members, PARTITION_COUNT)
        await routes.refresh(force=True)
        router = RouterService(routes)
        try:
            async with (
                serving(router) as router_address,
                grpc.aio.insecure_channel(shard_address) as shard_channel,
                grpc.aio.insecure_channel(router_address) as router_channel,
            ):
                yield Cluster(
                    owner,
                    router._calls,
                    pb_grpc.InventoryStub(shard_channel),
                    pb_grpc.InventoryStub(router_channel),
                )
        finally:
            await routes.close()


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    status = rpc_status.from_call(error)
    assert status is not None, "the service's answers carry details"
    return cast(status_pb2.Status, status)


LOCATIONS = ["store-a", "store-b", "warehouse-c"]


def test_an_order_whose_leg_is_unknown_at_first_resolves_it_then_compensates_nothing_held() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            for location in LOCATIONS:
                await c.set_stock(location, 5)
            # Leg 1 is reserved and durable, but its first answer is a failure: unknown.
            c.owner.faults["order-1/leg-1"] = ["applied_then_bug", ""]
            order = pb.ReserveOrderRequest(
                legs=[leg("store-a", 3), leg("store-b", 5), leg("warehouse-c", 6)],  # c short
                idempotency_key="order-1",
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.router_stub.ReserveOrder(order, timeout=WAIT_S)
            status = status_of(caught.value)
            assert errors.reason_of(status) == "INSUFFICIENT_STOCK"  # failed like leg 2
            assert errors.answer_class_of(status) is FINAL
            assert c.owner.attempts["order-1/leg-1"] == 2, "the unknown leg was resolved"
            assert await c.reserved(LOCATIONS) == [0, 0, 0], "no leg stays held until its TTL"

    run(scenario)


def test_an_order_whose_leg_stays_unknown_answers_unknown_and_its_retry_settles_it() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            for location in LOCATIONS:
                await c.set_stock(location, 5)
            # Applied at first, then every attempt to learn its fate fails before applying.
            c.owner.faults["order-2/leg-1"] = ["applied_then_bug", "bug"]
            order = pb.ReserveOrderRequest(
                legs=[leg("store-a", 3), leg("store-b", 5), leg("warehouse-c", 6)],
                idempotency_key="order-2",
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.router_stub.ReserveOrder(order, timeout=WAIT_S)
            status = status_of(caught.value)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert errors.reason_of(status) == "ORDER_OUTCOME_UNKNOWN"
            assert errors.answer_class_of(status) is UNKNOWN, "never 'failed' while unknown"
            assert c.owner.attempts["order-2/leg-1"] == 1 + orders.LEG_RESOLUTIONS_MAX
            # The taken leg was released; the unknown one may hold stock (it does).
            assert await c.reserved(LOCATIONS) == [0, 5, 0]
            c.owner.faults.clear()
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await c.router_stub.ReserveOrder(order, timeout=WAIT_S)
            assert errors.reason_of(status_of(again.value)) == "INSUFFICIENT_STOCK"
            assert await c.reserved(LOCATIONS) == [0, 0, 0]

    run(scenario)


def test_an_order_whose_leg_is_unknown_at_first_is_placed_once_the_leg_is_resolved() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            for location in LOCATIONS[:2]:
                await c.set_stock(location, 5)
            c.owner.faults["order-3/leg-1"] = ["applied_then_bug", ""]
            order = pb.ReserveOrderRequest(
                legs=[leg("store-a", 3), leg("store-b", 5)], idempotency_key="order-3"
            )
            placed = await c.router_stub.ReserveOrder(order, timeout=WAIT_S)
            assert [r.state for r in placed.reservations] == [pb.RESERVATION_STATE_ACTIVE] * 2
            assert await c.reserved(LOCATIONS[:2]) == [3, 5]
            again = await c.router_stub.ReserveOrder(order, timeout=WAIT_S)
            assert [r.reservation_id for r in again.reservations] == [
                r.reservation_id for r in placed.reservations
            ]

    run(scenario)


def test_a_shard_answers_reserve_order_unimplemented_from_the_table() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            order = pb.ReserveOrderRequest(legs=[leg("store-a", 1)], idempotency_key="o")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.shard_stub.ReserveOrder(order, timeout=WAIT_S)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert errors.reason_of(status_of(caught.value)) == "UNIMPLEMENTED"

    run(scenario)


async def router_reserve(c: Cluster, idempotency_key: str, timeout_s: float) -> status_pb2.Status:
    request = leg("store-a", 1)
    request.idempotency_key = idempotency_key
    with pytest.raises(Refusal) as caught:
        await c.router.reserve(request, time.monotonic() + timeout_s)
    return caught.value.status


def test_the_router_gives_up_retryable_only_when_every_attempt_was_known_not_applied() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            await c.set_stock("store-a", 5)
            c.owner.faults["moving"] = ["not_owner"]
            status = await router_reserve(c, "moving", 0.3)
            assert errors.reason_of(status) == "DEADLINE_NOT_APPLIED"
            assert errors.answer_class_of(status) is RETRYABLE
            assert c.owner.attempts["moving"] > 1

            # Durable, but answered "flush outcome unknown"; every retry then fails to flush.
            c.owner.faults["committed"] = ["applied_then_unknown", "flush_failed"]
            status = await router_reserve(c, "committed", 0.3)
            assert status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert errors.answer_class_of(status) is UNKNOWN, "it was applied: never 'not applied'"
            assert await c.reserved(["store-a"]) == [1]

            # An unknown attempt, then a definite "not applied" from load shedding: unknown.
            c.owner.faults["shed"] = ["applied_then_unknown", "overloaded"]
            status = await router_reserve(c, "shed", 5.0)
            assert errors.answer_class_of(status) is UNKNOWN

            # Its retry with the same key lands on the true fate: applied once.
            del c.owner.faults["committed"]
            request = leg("store-a", 1)
            request.idempotency_key = "committed"
            answer = await c.router.reserve(request, time.monotonic() + 5.0)
            assert answer.reservation.state == pb.RESERVATION_STATE_ACTIVE
            assert await c.reserved(["store-a"]) == [2]  # "committed" and "shed", once each

    run(scenario)


def test_an_unknown_attempt_followed_by_a_definite_answer_gives_the_definite_answer() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            await c.set_stock("store-a", 5)
            c.owner.faults["retried"] = ["applied_then_unknown", ""]
            request = leg("store-a", 2)
            request.idempotency_key = "retried"
            answer = await c.router.reserve(request, time.monotonic() + 5.0)
            assert c.owner.attempts["retried"] == 2
            assert answer.reservation.state == pb.RESERVATION_STATE_ACTIVE
            assert await c.reserved(["store-a"]) == [2], "applied once"

    run(scenario)
