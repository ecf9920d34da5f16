"""Each answer class seen end to end: what the caller is told matches what happened.

The real ``InventoryService`` over an ``Owner`` and the fake store of test_owner.py, served by
an in-process gRPC server on 127.0.0.1. The first attempt goes through a raw stub, so that
the exact status is seen; the retry goes through the public client with the same
idempotency key, as an order service would send it, and must land on the true fate:

  - a flush that commits and then fails: UNAVAILABLE, outcome unknown; the retry after the
    partition recovered gets the original reservation, not a second one;
  - a deadline that passes while the work waits in the owner's queue: DEADLINE_EXCEEDED that
    says nothing was applied (retryable); the retry applies it, once;
  - a client deadline shorter than a slow flush: DEADLINE_EXCEEDED from gRPC itself, with no
    server detail, so outcome unknown; the flush completes and the retry gets the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import cast

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import Reserve, SetStock, partition_of
from shard_router.client import InventoryClient, key, line
from shard_router.common import errors
from shard_router.common.errors import AnswerClass, answer_class_of
from shard_router.shard.owner import Owner, OwnerLimits
from shard_router.shard.service import InventoryService

from ..task_count import tasks_created
from .test_owner import WAIT_S, FakeStore, run, until

APPLE = key("m1", "apple", "loc-3")
PARTITION = partition_of("m1", "loc-3")
# Generous per-call deadline for every call that is not about deadlines: the machine may be
# loaded, and no test waits for it to pass.
CALL_TIMEOUT_S = 10.0
RESERVE = pb.ReserveRequest(lines=[line(APPLE, 2)], ttl_s=60, idempotency_key="order-1")


@dataclass
class Served:
    owner: Owner
    store: FakeStore
    stub: pb_grpc.InventoryAsyncStub
    address: str

    def commands(self) -> list[type[object]]:
        return [type(record.command) for record in self.store.durable[PARTITION]]

    async def retry(self) -> pb.ReserveResponse:
        """The order service's retry of RESERVE, through the public client."""
        async with InventoryClient(self.address, batching=False, seed=1) as client:
            return await client.reserve(
                RESERVE.lines,
                idempotency_key=RESERVE.idempotency_key,
                ttl_s=RESERVE.ttl_s,
                timeout_s=CALL_TIMEOUT_S,
            )


@contextlib.asynccontextmanager
async def served() -> AsyncIterator[Served]:
    store = FakeStore()
    store.own(PARTITION)
    owner = Owner(store, limits=OwnerLimits(timer_tick_s=3600, recovery_backoff_s_max=0.01))
    owner.adopt(await store.load([PARTITION]), await store.epochs([PARTITION]))
    store.loads.clear()
    loop = asyncio.create_task(owner.run())
    server = grpc.aio.server()
    pb_grpc.add_InventoryServicer_to_server(InventoryService(owner), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = cast("pb_grpc.InventoryAsyncStub", pb_grpc.InventoryStub(channel))
            await stub.SetStock(
                pb.SetStockRequest(key=APPLE, on_hand=10, idempotency_key="stock-1"),
                timeout=CALL_TIMEOUT_S,
            )
            yield Served(owner, store, stub, address)
    finally:
        for gate in (store.flush_gate, store.load_gate):
            if gate is not None:
                gate.set()
        await server.stop(0)
        loop.cancel()
        await asyncio.wait([loop])
        await owner.close()


async def failed_status(call: Awaitable[object]) -> status_pb2.Status:
    """The google.rpc.Status a call failed with; gRPC's own answers carry no details."""
    try:
        answer = await call
    except grpc.aio.AioRpcError as error:
        found = rpc_status.from_call(error)
        if found is not None:
            assert isinstance(found, status_pb2.Status)
            return found
        return errors.status(error.code(), error.details() or "")
    raise AssertionError(f"the call succeeded: {answer}")


def code_of(status: status_pb2.Status) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == status.code)


def reservations_held(s: Served) -> list[str]:
    return sorted(s.store.rebuild(PARTITION).snapshot().reservations)


def test_flush_that_commits_then_fails_is_outcome_unknown_and_the_retry_gets_the_original() -> None:
    async def body() -> None:
        async with served() as s:
            s.store.fail_flushes_after_commit = 1
            s.store.load_gate = asyncio.Event()
            status = await failed_status(s.stub.Reserve(RESERVE, timeout=CALL_TIMEOUT_S))
            assert code_of(status) is grpc.StatusCode.UNAVAILABLE, status
            assert answer_class_of(status) is AnswerClass.OUTCOME_UNKNOWN, status
            assert s.commands() == [SetStock, Reserve]  # it was applied after all

            # While the partition reloads, a retry is refused, and says nothing was applied.
            status = await failed_status(s.stub.Reserve(RESERVE, timeout=CALL_TIMEOUT_S))
            assert code_of(status) is grpc.StatusCode.UNAVAILABLE, status
            assert answer_class_of(status) is AnswerClass.RETRYABLE, status
            s.store.load_gate.set()
            await until(lambda: s.owner.owns(PARTITION), "recovery from the store")

            again = await s.retry()
            assert reservations_held(s) == [again.reservation.reservation_id]
            assert s.commands() == [SetStock, Reserve]  # no second reservation
            assert (again.levels[0].on_hand, again.levels[0].reserved) == (10, 2)

    run(body)


# How long the queued item may wait; the test sleeps past it (time must pass, that is all).
ITEM_TIMEOUT_S = 0.05


def test_deadline_passed_in_the_queue_says_not_applied_and_the_retry_applies_it_once() -> None:
    async def body() -> None:
        async with served() as s:
            s.store.flush_gate = asyncio.Event()
            stocking = asyncio.ensure_future(
                s.stub.SetStock(
                    pb.SetStockRequest(key=APPLE, on_hand=12, idempotency_key="stock-2"),
                    timeout=CALL_TIMEOUT_S,
                )
            )
            await until(lambda: len(s.store.flush_calls) == 2, "the blocking flush")
            # The next batch is applied while that flush is in flight, and waits for it...
            restocking = asyncio.ensure_future(
                s.stub.SetStock(
                    pb.SetStockRequest(key=APPLE, on_hand=12, idempotency_key="stock-3"),
                    timeout=CALL_TIMEOUT_S,
                )
            )
            await until(lambda: s.owner._holding is not None, "the next batch to be applied")
            # ...so a Batch item with its own short deadline queues behind both; the
            # stream's own deadline is long, so the answer is the server's, not gRPC's.
            stream = s.stub.Batch(timeout=CALL_TIMEOUT_S)
            item = pb.BatchItem(id=7, timeout_ms=int(ITEM_TIMEOUT_S * 1000), reserve=RESERVE)
            await stream.write(pb.BatchRequest(items=[item]))
            await until(lambda: s.owner.queue_depth() == 1, "the item to queue")
            await asyncio.sleep(ITEM_TIMEOUT_S * 2)
            s.store.flush_gate.set()
            await stocking
            await restocking
            response = await stream.read()
            assert isinstance(response, pb.BatchResponse)
            (result,) = response.results
            assert result.WhichOneof("result") == "error", result
            status = result.error
            assert code_of(status) is grpc.StatusCode.DEADLINE_EXCEEDED, status
            assert errors.reason_of(status) == "DEADLINE_NOT_APPLIED", status
            assert answer_class_of(status) is AnswerClass.RETRYABLE, status
            await stream.done_writing()
            assert s.commands() == [SetStock] * 3  # the reservation was not applied

            again = await s.retry()
            assert s.commands() == [SetStock] * 3 + [Reserve]  # applied afresh, once
            assert reservations_held(s) == [again.reservation.reservation_id]
            assert again.levels[0].reserved == 2

    run(body)


# Shorter than the flush (held until the deadline fired) and long enough that the request
# reaches the owner first on a loaded machine.
CLIENT_TIMEOUT_S = 1.5


def test_client_deadline_shorter_than_a_slow_flush_is_outcome_unknown_and_retry_finds_fate() -> (
    None
):
    async def body() -> None:
        async with served() as s:
            s.store.flush_gate = asyncio.Event()
            started = time.monotonic()
            call = asyncio.create_task(
                failed_status(s.stub.Reserve(RESERVE, timeout=CLIENT_TIMEOUT_S))
            )
            await until(lambda: len(s.store.flush_calls) == 2, "the reservation's flush")
            assert time.monotonic() - started < CLIENT_TIMEOUT_S, "the request came too late"
            status = await asyncio.wait_for(call, WAIT_S)
            assert code_of(status) is grpc.StatusCode.DEADLINE_EXCEEDED, status
            assert errors.error_info_of(status) is None, "gRPC's own answer has no detail"
            assert answer_class_of(status) is AnswerClass.OUTCOME_UNKNOWN, status

            s.store.flush_gate.set()
            await until(lambda: s.commands() == [SetStock, Reserve], "the flush to commit")
            again = await s.retry()
            assert reservations_held(s) == [again.reservation.reservation_id]
            assert s.commands() == [SetStock, Reserve]  # the original, not a second one
            assert again.levels[0].reserved == 2

    run(body)


def test_a_batch_of_mutations_costs_the_shard_no_task_per_item() -> None:
    """The shard's Batch stream hands mutations to the owner by callback; only the reads
    (and items carrying metadata) run as tasks. Every item still gets its own answer."""
    items_count = 300

    async def body() -> None:
        async with served() as s:
            await s.stub.SetStock(
                pb.SetStockRequest(key=APPLE, on_hand=100, idempotency_key="stock-100"),
                timeout=CALL_TIMEOUT_S,
            )
            request = pb.BatchRequest()
            for index in range(items_count):
                reserve = pb.ReserveRequest(
                    lines=[line(APPLE, 1)], ttl_s=60, idempotency_key=f"r-{index}"
                )
                request.items.add(id=index, reserve=reserve)
            request.items.add(
                id=items_count, get_availability=pb.GetAvailabilityRequest(keys=[APPLE])
            )
            request.items.add(id=items_count + 1, reserve=pb.ReserveRequest())  # malformed
            stream = s.stub.Batch(timeout=CALL_TIMEOUT_S)
            with tasks_created() as created:
                await stream.write(request)
                await stream.done_writing()
                results: dict[int, pb.BatchItemResult] = {}
                while len(results) < items_count + 2:
                    response = await stream.read()
                    assert isinstance(response, pb.BatchResponse)
                    results.update((result.id, result) for result in response.results)
        kinds = [results[i].WhichOneof("result") for i in range(items_count)]
        assert kinds.count("reserve") == 100  # the stock held exactly 100 units
        refused = [results[i].error for i in range(items_count) if kinds[i] == "error"]
        assert {errors.reason_of(status) for status in refused} == {"INSUFFICIENT_STOCK"}
        assert results[items_count].WhichOneof("result") == "get_availability"
        assert errors.reason_of(results[items_count + 1].error) == "INVALID_ARGUMENT"
        assert len(created) < 20, created  # the read's task, the stream's, gRPC's own

    run(body)
