"""The client's policy against a scripted in-process server: retries, exceptions, batching
bounds, broken streams and deadlines. No PostgreSQL; the real shard is in test_client.py."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

import grpc
import pytest
from inventory.v1 import inventory_pb2 as pb

import inventory_core as core
import shard_router.client as client_package
from shard_router.client import (
    AnswerClass,
    CapacityExhausted,
    DeadlineExceeded,
    IdempotencyKeyReused,
    InsufficientStock,
    InvalidArgument,
    InventoryClient,
    InventoryError,
    NotApplied,
    OutcomeUnknown,
    Overloaded,
    ReservationNotActive,
    ReservationNotFound,
    SplitConflict,
    StreamBatcher,
    Unavailable,
    VersionMismatch,
    key,
    line,
)
from shard_router.common import errors
from tests.client.fake_inventory import FakeInventory, fake_inventory, serving, statuses

BATCHING = pytest.mark.parametrize("batching", [True, False], ids=["batched", "unary"])


def fast_client(
    address: str, *, batching: bool = True, retry_attempts_max: int = 8, seed: int = 1
) -> InventoryClient:
    """Pauses of milliseconds between retries, so retry tests stay fast."""
    return InventoryClient(
        address,
        batching=batching,
        retry_attempts_max=retry_attempts_max,
        backoff_s_initial=0.001,
        backoff_s_max=0.005,
        seed=seed,
    )


def reserve_line(sku: str = "sku-1", quantity: int = 1) -> pb.ReservationLine:
    return line(key("m-1", sku, "store-1"), quantity)


def run_with(fake: FakeInventory, scenario: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serving(fake) as address:
            await scenario(address)

    asyncio.run(main())


# ------------------------------------------------------------------------- public surface


def test_public_surface_is_exactly_the_documented_names() -> None:
    assert sorted(client_package.__all__) == [
        "AnswerClass",
        "BatcherStats",
        "CapacityExhausted",
        "ChannelTLSConfig",
        "DeadlineExceeded",
        "IdempotencyKeyReused",
        "InsufficientStock",
        "InvalidArgument",
        "InventoryClient",
        "InventoryError",
        "NotApplied",
        "OutcomeUnknown",
        "Overloaded",
        "ReservationNotActive",
        "ReservationNotFound",
        "SplitConflict",
        "StreamBatcher",
        "Unavailable",
        "VersionMismatch",
        "key",
        "line",
    ]
    public = {name for name in vars(client_package) if not name.startswith("_")}
    modules = {"annotations"}  # from __future__, if ever added
    assert public - modules == set(client_package.__all__)


def test_every_exception_is_an_inventory_error() -> None:
    for name in client_package.__all__:
        value = getattr(client_package, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, InventoryError), name


# ------------------------------------------------------------------------------- retries


@BATCHING
def test_unavailable_twice_then_ok_is_retried_with_the_same_idempotency_key(
    batching: bool,
) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    fake = fake_inventory(script=deque(statuses(*[grpc.StatusCode.UNAVAILABLE] * 2)))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching, seed=seed) as c:
            answer = await c.reserve([reserve_line()], idempotency_key="order-1")
        assert isinstance(answer, pb.ReserveResponse)
        assert answer.reservation.reservation_id == "r-order-1"

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"] * 3


@BATCHING
def test_not_owner_redirect_is_retried(batching: bool) -> None:
    fake = fake_inventory(script=deque([errors.not_owner_status(7, "partition 7 is recovering")]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            await c.reserve([reserve_line()], idempotency_key="order-1")

    run_with(fake, scenario)
    assert fake.count("order-1") == 2


@BATCHING
@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
    ],
)
def test_a_status_without_answer_class_of_a_final_code_is_final_and_not_retried(
    batching: bool, code: grpc.StatusCode
) -> None:
    fake = fake_inventory(script=deque(statuses(code)))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            with pytest.raises(InventoryError) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1")
        assert type(caught.value) is InventoryError
        assert caught.value.code == code
        assert caught.value.answer_class is AnswerClass.FINAL

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"]


@BATCHING
@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
    ],
)
def test_a_status_without_answer_class_of_an_unknown_code_is_resent_with_the_same_key(
    batching: bool, code: grpc.StatusCode
) -> None:
    """Such a status may be gRPC's own (a deadline, a transport): it may have been applied."""
    fake = fake_inventory(script=deque(statuses(code)))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            answer = await c.reserve([reserve_line()], idempotency_key="order-1")
        assert answer.reservation.reservation_id == "r-order-1"

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"] * 2
    assert fake.applied["order-1"] == 1


@BATCHING
def test_retries_stop_at_retry_attempts_max_with_unavailable(batching: bool) -> None:
    fake = fake_inventory(script=deque(statuses(*[grpc.StatusCode.UNAVAILABLE] * 10)))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching, retry_attempts_max=3) as c:
            with pytest.raises(Unavailable) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1")
        assert caught.value.attempts == 3
        assert isinstance(caught.value, OutcomeUnknown)  # a bare UNAVAILABLE may be applied

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"] * 3


@BATCHING
def test_retries_stop_at_the_calls_deadline(batching: bool) -> None:
    fake = fake_inventory(script=deque(statuses(*[grpc.StatusCode.UNAVAILABLE] * 1000)))

    async def scenario(address: str) -> None:
        async with InventoryClient(
            address,
            batching=batching,
            retry_attempts_max=1000,
            backoff_s_initial=0.02,
            backoff_s_max=0.05,
            seed=1,
        ) as c:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1", timeout_s=0.3)
            assert time.monotonic() - started < 0.3 + 0.1
        assert caught.value.answer_class is AnswerClass.OUTCOME_UNKNOWN
        # The deadline fires in the retry loop's backoff, with the last attempt still queued
        # on the stream, or with it sent and unanswered: three wordings, each saying unknown.
        assert "unknown" in str(caught.value), caught.value

    run_with(fake, scenario)
    assert 2 <= fake.count("order-1") < 1000


def test_stream_closed_mid_flight_fails_pending_items_and_they_succeed_on_a_new_stream() -> None:
    fake = fake_inventory(streams_to_break=1)
    calls = 50

    async def scenario(address: str) -> None:
        async with fast_client(address) as c:
            answers = await asyncio.gather(
                *(c.reserve([reserve_line()], idempotency_key=f"order-{i}") for i in range(calls))
            )
            stats = c.batcher_stats
        assert [a.reservation.reservation_id for a in answers] == [
            f"r-order-{i}" for i in range(calls)
        ]
        assert stats is not None
        assert (stats.streams_opened, stats.streams_broken) == (2, 1)
        assert stats.items_failed_unavailable == calls

    run_with(fake, scenario)
    assert fake.streams_opened == 2
    assert all(fake.count(f"order-{i}") == 2 for i in range(calls))  # sent, broken, resent


# ---------------------------------------------------------------------------- exceptions

KEY = core.InventoryKey("m-1", "sku-1", "store-1")
REJECTIONS: list[tuple[core.Rejection, type[InventoryError], dict[str, object]]] = [
    (
        core.Invalid("lines[0].quantity", "1 to 1000000"),
        InvalidArgument,
        {"field": "lines[0].quantity", "reason": "1 to 1000000"},
    ),
    (
        core.InsufficientStock((core.ShortLine(KEY, 5, 3),)),
        InsufficientStock,
        {"lines": (core.ShortLine(KEY, 5, 3),)},
    ),
    (core.ReservationNotFound("r-9"), ReservationNotFound, {"reservation_id": "r-9"}),
    (
        core.ReservationNotActive("r-9", core.ReservationState.EXPIRED, 1234),
        ReservationNotActive,
        {"reservation_id": "r-9", "state": core.ReservationState.EXPIRED, "changed_at_ms": 1234},
    ),
    (
        core.VersionMismatch(KEY, 4, 6),
        VersionMismatch,
        {"key": KEY, "expected_version": 4, "current_version": 6},
    ),
    (
        core.IdempotencyKeyReused("order-1", "reserve"),
        IdempotencyKeyReused,
        {"idempotency_key": "order-1", "original_kind": "reserve"},
    ),
    (
        core.CapacityExhausted("live_reservations_max", 100),
        CapacityExhausted,
        {"limit_name": "live_reservations_max", "limit": 100},
    ),
    (
        core.SplitConflict(KEY, "merging: its buckets get no more units"),
        SplitConflict,
        {"key": KEY, "reason": "merging: its buckets get no more units"},
    ),
]


@BATCHING
@pytest.mark.parametrize(
    ("rejection", "raised", "fields"), REJECTIONS, ids=[type(r[0]).__name__ for r in REJECTIONS]
)
def test_each_rejection_raises_its_exception_with_the_domain_fields(
    batching: bool,
    rejection: core.Rejection,
    raised: type[InventoryError],
    fields: dict[str, object],
) -> None:
    fake = fake_inventory(script=deque([errors.rejection_to_status(rejection)]))

    async def scenario(address: str) -> None:
        async with InventoryClient(address, batching=batching) as c:
            with pytest.raises(raised) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1")
        error = caught.value
        assert type(error) is raised
        assert {name: getattr(error, name) for name in fields} == fields
        assert error.code == errors.CODES[type(rejection)][0]

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"]  # a rejection is final


def test_every_rejection_type_has_an_exception() -> None:
    assert {type(r) for r, _, _ in REJECTIONS} == set(errors.CODES)


# ------------------------------------------------------------------------------ deadlines


def test_each_item_keeps_its_own_deadline_on_a_shared_stream() -> None:
    fake = fake_inventory()

    async def scenario(address: str) -> None:
        async with InventoryClient(address) as c:
            started = time.monotonic()

            async def slow() -> float:
                # The server's own answer, within the batcher's grace: known not applied.
                with pytest.raises(NotApplied) as caught:
                    await c.reserve([reserve_line("slow-1")], idempotency_key="slow", timeout_s=0.3)
                assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "nothing applied" in caught.value.status.message
                return time.monotonic() - started

            async def fast() -> float:
                # In a later BatchRequest: the server answers a request when all its items are.
                await asyncio.sleep(0.05)
                await c.reserve([reserve_line()], idempotency_key="fast", timeout_s=5.0)
                return time.monotonic() - started

            slow_s, fast_s = await asyncio.gather(slow(), fast())
        assert 0.25 <= slow_s < 0.3 + 0.2
        assert fast_s < 0.25

    run_with(fake, scenario)
    timeout_ms = sorted(fake.timeouts_ms)
    assert 250 < timeout_ms[0] <= 300  # what was left of 0.3 s when it was sent
    assert 4900 < timeout_ms[1] <= 5000


def test_an_item_the_server_never_answers_is_given_up_after_its_deadline_and_grace() -> None:
    fake = fake_inventory()

    async def scenario(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            batcher = StreamBatcher(channel, answer_grace_s=0.1, close_drain_s_max=0.1)
            request = pb.ReserveRequest(lines=[reserve_line("silent-1")], idempotency_key="x")
            started = time.monotonic()
            result = await batcher.call("reserve", request, 0.2)
            elapsed_s = time.monotonic() - started
            assert result.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert "outcome unknown" in result.error.message
            # The loop's timers may fire up to its clock's resolution early (0.29998 s seen).
            assert 0.3 - 0.005 <= elapsed_s < 0.5
            assert batcher.stats.items_expired == 1
            assert batcher.pending_items == 0
            await batcher.close()

    run_with(fake, scenario)


# ------------------------------------------------------------------- the batcher's bounds


def test_pending_items_max_admits_exactly_the_bound_then_raises_overloaded() -> None:
    fake = fake_inventory()
    bound = 20

    async def scenario(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            batcher = StreamBatcher(channel, pending_items_max=bound, close_drain_s_max=0.1)

            async def call(sku: str) -> pb.BatchItemResult:
                request = pb.ReserveRequest(lines=[reserve_line(sku)], idempotency_key=sku)
                return await batcher.call("reserve", request, 10.0)

            waiting = [asyncio.create_task(call(f"silent-{i}")) for i in range(bound)]
            await asyncio.sleep(0.05)
            assert batcher.pending_items == bound
            with pytest.raises(Overloaded) as caught:
                await call("silent-over")
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"pending_items_max ({bound})" in str(caught.value)
            waiting[0].cancel()  # one caller gives up: room for exactly one more
            await asyncio.sleep(0)
            assert batcher.pending_items == bound - 1
            waiting.append(asyncio.create_task(call("silent-again")))
            await asyncio.sleep(0)
            assert batcher.pending_items == bound
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            await batcher.close()

    run_with(fake, scenario)


def test_batch_items_max_and_requests_in_flight_max_bound_what_is_on_the_wire() -> None:
    fake = fake_inventory(answer_delay_s=0.02)
    calls = 1300

    async def scenario(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            batcher = StreamBatcher(channel, batch_items_max=100, requests_in_flight_max=2)
            requests = [
                pb.ReserveRequest(lines=[reserve_line()], idempotency_key=f"order-{i}")
                for i in range(calls)
            ]
            results = await asyncio.gather(*(batcher.call("reserve", r, 10.0) for r in requests))
            await batcher.close()
        assert sorted(r.id for r in results) == sorted({r.id for r in results})
        assert [r.reserve.reservation.reservation_id for r in results] == [
            f"r-order-{i}" for i in range(calls)
        ]
        assert batcher.stats.items_sent == calls

    run_with(fake, scenario)
    assert max(fake.request_sizes) == 100  # driven to the bound, never past it
    assert fake.requests_outstanding_max == 2
    assert sum(fake.request_sizes) == calls


def test_a_stream_is_idle_only_when_nothing_is_queued_or_in_flight() -> None:
    """Items being written count as pending: a drain must not half-close under their write."""
    fake = fake_inventory(answer_delay_s=0.2)

    async def scenario(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            batcher = StreamBatcher(channel)
            request = pb.ReserveRequest(lines=[reserve_line()], idempotency_key="order-1")
            pending = asyncio.create_task(batcher.call("reserve", request, 5.0))
            await asyncio.sleep(0.05)  # taken and written; its answer is 0.2 s away
            stream = batcher._stream
            assert stream is not None and stream.pending == 1
            assert not stream._idle.is_set(), "idle with an item in flight"
            await pending
            assert stream._idle.is_set()
            await batcher.close()

    run_with(fake, scenario)


def test_close_drains_pending_calls_and_leaves_no_task_behind() -> None:
    fake = fake_inventory(answer_delay_s=0.05)

    def batcher_tasks() -> list[asyncio.Task[object]]:
        return [
            t
            for t in asyncio.all_tasks()
            if "_Stream." in getattr(t.get_coro(), "__qualname__", "")
        ]

    async def scenario(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            batcher = StreamBatcher(channel)
            request = pb.ReserveRequest(lines=[reserve_line()], idempotency_key="order-1")
            pending = asyncio.create_task(batcher.call("reserve", request, 5.0))
            await asyncio.sleep(0.01)
            assert len(batcher_tasks()) == 3  # the stream's run task, its reader and writer
            await batcher.close()
            assert pending.done()
            assert pending.result().reserve.reservation.reservation_id == "r-order-1"
            with pytest.raises(RuntimeError):
                await batcher.call("reserve", request, 5.0)
            assert batcher_tasks() == []

    run_with(fake, scenario)
