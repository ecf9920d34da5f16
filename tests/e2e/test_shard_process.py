"""The shard as a real process over real PostgreSQL: races, kill -9, bad input."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inventory.v1 import errors_pb2
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from tests.conftest import ShardProcess

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

# Per-call deadline of the test clients: generous, the machine is shared with the server.
CALL_TIMEOUT_S = 10.0


def key(sku: str, location: str = "store-1", merchant: str = "m-1") -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=merchant, sku_id=sku, location_id=location)


def line(k: pb.InventoryKey, quantity: int) -> pb.ReservationLine:
    return pb.ReservationLine(key=k, quantity=quantity)


def details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    found: dict[str, object] = {}
    for detail in status.details:
        for message in (
            errors_pb2.InsufficientStock(),
            errors_pb2.IdempotencyKeyReused(),
            errors_pb2.ReservationNotActive(),
            errors_pb2.VersionMismatch(),
            error_details_pb2.BadRequest(),
            error_details_pb2.ResourceInfo(),
            error_details_pb2.ErrorInfo(),
        ):
            if detail.Is(message.DESCRIPTOR):
                detail.Unpack(message)
                found[message.DESCRIPTOR.name] = message
    return found


async def level(stub: pb_grpc.InventoryStub, k: pb.InventoryKey) -> pb.StockLevel:
    answer = await stub.GetAvailability(pb.GetAvailabilityRequest(keys=[k]), timeout=CALL_TIMEOUT_S)
    return answer.levels[0]


def test_last_unit_race_admits_exactly_the_stock(shard: ShardProcess) -> None:
    """100 units, 64 concurrent clients, 300 one-unit attempts: exactly 100 admitted."""
    stock, clients, attempts = 100, 64, 300

    async def run() -> tuple[Counter[str], int]:
        async with grpc.aio.insecure_channel(shard.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            hot = key("last-unit")
            await stub.SetStock(pb.SetStockRequest(key=hot, on_hand=stock, idempotency_key="seed"))
            tickets = iter(range(attempts))
            outcomes: Counter[str] = Counter()

            async def client() -> None:
                for ticket in tickets:
                    request = pb.ReserveRequest(lines=[line(hot, 1)], idempotency_key=f"o-{ticket}")
                    try:
                        await stub.Reserve(request, timeout=CALL_TIMEOUT_S)
                        outcomes["admitted"] += 1
                    except grpc.aio.AioRpcError as error:
                        found = details(error)
                        short = found.get("InsufficientStock")
                        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                        assert isinstance(short, errors_pb2.InsufficientStock)
                        assert short.lines[0].requested == 1
                        assert short.lines[0].available == 0
                        outcomes["refused"] += 1

            await asyncio.gather(*(client() for _ in range(clients)))
            final = await level(stub, hot)
            assert final.reserved == stock and final.available == 0 and final.sellable == 0
            return outcomes, final.reserved

    outcomes, reserved = asyncio.run(run())
    assert outcomes == Counter(admitted=stock, refused=attempts - stock)
    assert reserved == stock


@dataclass
class Attempt:
    idempotency_key: str
    lines: list[tuple[str, int]]
    reservation_id: str | None = None  # set when acknowledged
    unknown: bool = False  # the call failed in flight: may or may not have happened


def test_kill_9_during_reservation_load_loses_no_acknowledged_reservation(
    shard: ShardProcess,
) -> None:
    """kill -9 mid-load, restart: acknowledged = durable, nothing half-applied, retries agree."""
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    skus = [f"sku-{i}" for i in range(20)]
    attempts: list[Attempt] = []

    async def load(stop_after_s: float) -> None:
        async with grpc.aio.insecure_channel(shard.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            for sku in skus:
                request = pb.SetStockRequest(key=key(sku), on_hand=100_000, idempotency_key=sku)
                await stub.SetStock(request, timeout=CALL_TIMEOUT_S)
            stop_at = asyncio.get_running_loop().time() + stop_after_s
            counter = iter(range(1_000_000))

            async def worker() -> None:
                while asyncio.get_running_loop().time() < stop_at:
                    picked = rng.sample(skus, 2)  # two lines: a cart is all or nothing
                    attempt = Attempt(
                        f"cart-{next(counter)}", [(s, rng.randint(1, 3)) for s in picked]
                    )
                    attempts.append(attempt)
                    request = pb.ReserveRequest(
                        lines=[line(key(s), q) for s, q in attempt.lines],
                        idempotency_key=attempt.idempotency_key,
                    )
                    try:
                        answer = await stub.Reserve(request, timeout=CALL_TIMEOUT_S)
                        attempt.reservation_id = answer.reservation.reservation_id
                    except grpc.aio.AioRpcError:
                        attempt.unknown = True
                        return  # the server is gone

            await asyncio.gather(*(worker() for _ in range(16)))

    async def kill_soon() -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(shard.kill)

    async def crash_run() -> None:
        await asyncio.gather(load(stop_after_s=20.0), kill_soon())

    asyncio.run(crash_run())
    acknowledged = [a for a in attempts if a.reservation_id]
    assert len(acknowledged) > 50, "the load did not run long enough before the kill"
    assert any(a.unknown for a in attempts), "the kill did not land during the load"
    shard.start()

    async def verify() -> None:
        async with grpc.aio.insecure_channel(shard.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            for attempt in acknowledged:  # every acknowledged reservation is there, whole
                found = await stub.GetReservation(
                    pb.GetReservationRequest(
                        merchant_id="m-1", reservation_id=attempt.reservation_id
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                held = sorted((x.key.sku_id, x.quantity) for x in found.reservation.lines)
                assert held == sorted(attempt.lines)
                assert found.reservation.state == pb.RESERVATION_STATE_ACTIVE
            expected: Counter[str] = Counter()
            for attempt in attempts:  # a retry returns the original answer, or runs afresh
                request = pb.ReserveRequest(
                    lines=[line(key(s), q) for s, q in attempt.lines],
                    idempotency_key=attempt.idempotency_key,
                )
                answer = await stub.Reserve(request, timeout=CALL_TIMEOUT_S)
                if attempt.reservation_id:
                    assert answer.reservation.reservation_id == attempt.reservation_id
                for sku, quantity in attempt.lines:
                    expected[sku] += quantity
            for sku in skus:  # nothing half-applied: reserved is exactly the carts held
                found_level = await level(stub, key(sku))
                assert found_level.reserved == expected[sku], sku
                assert found_level.on_hand == 100_000

    asyncio.run(verify())


def test_bad_input_gets_its_precise_status_and_changes_nothing(shard: ShardProcess) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(shard.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            k = key("milk")
            await stub.SetStock(pb.SetStockRequest(key=k, on_hand=10, idempotency_key="s"))
            held = await stub.Reserve(pb.ReserveRequest(lines=[line(k, 2)], idempotency_key="r"))
            before = await level(stub, k)

            async def refused(call: object, code: grpc.StatusCode) -> dict[str, object]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call  # type: ignore[misc]
                assert caught.value.code() == code, caught.value
                return details(caught.value)

            def violation(found: dict[str, object]) -> tuple[str, str]:
                bad = found["BadRequest"]
                assert isinstance(bad, error_details_pb2.BadRequest)
                return bad.field_violations[0].field, bad.field_violations[0].description

            invalid = grpc.StatusCode.INVALID_ARGUMENT
            found = await refused(stub.Reserve(pb.ReserveRequest(idempotency_key="e")), invalid)
            assert violation(found)[0] == "lines"
            for quantity in (0, -3):
                request = pb.ReserveRequest(lines=[line(k, quantity)], idempotency_key="q")
                found = await refused(stub.Reserve(request), invalid)
                assert violation(found)[0] == "lines[0].quantity"
            oversized = pb.ReserveRequest(
                lines=[line(key(f"s{i}"), 1) for i in range(101)], idempotency_key="big"
            )
            found = await refused(stub.Reserve(oversized), invalid)
            assert violation(found) == ("lines", "at most 100 lines, got 101")
            too_many_keys = pb.GetAvailabilityRequest(keys=[key(f"s{i}") for i in range(1001)])
            found = await refused(stub.GetAvailability(too_many_keys), invalid)
            assert violation(found)[0] == "keys"
            missing = pb.CommitRequest(
                merchant_id="m-1", reservation_id="r0001-0000009999", idempotency_key="c"
            )
            found = await refused(stub.Commit(missing), grpc.StatusCode.NOT_FOUND)
            assert "ResourceInfo" in found
            reused = pb.ReserveRequest(lines=[line(k, 3)], idempotency_key="r")
            found = await refused(stub.Reserve(reused), grpc.StatusCode.ALREADY_EXISTS)
            assert isinstance(found["IdempotencyKeyReused"], errors_pb2.IdempotencyKeyReused)
            stale = pb.SetStockRequest(key=k, on_hand=50, expected_version=1, idempotency_key="v")
            found = await refused(stub.SetStock(stale), grpc.StatusCode.ABORTED)
            mismatch = found["VersionMismatch"]
            assert isinstance(mismatch, errors_pb2.VersionMismatch)
            assert mismatch.current_version == before.version
            no_reason = pb.AdjustStockRequest(key=k, delta=5, idempotency_key="a")
            found = await refused(stub.AdjustStock(no_reason), invalid)
            assert violation(found)[0] == "reason"
            after = await level(stub, k)
            assert after == before
            again = await stub.Reserve(pb.ReserveRequest(lines=[line(k, 2)], idempotency_key="r"))
            assert again.reservation.reservation_id == held.reservation.reservation_id

    asyncio.run(run())


def test_restart_recovers_state_from_checkpoint_and_ledger(shard: ShardProcess) -> None:
    async def write_then_read() -> tuple[pb.StockLevel, str]:
        async with grpc.aio.insecure_channel(shard.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            k = key("eggs", "store-9")
            await stub.SetStock(pb.SetStockRequest(key=k, on_hand=40, idempotency_key="s"))
            held = await stub.Reserve(pb.ReserveRequest(lines=[line(k, 7)], idempotency_key="r"))
            await stub.AdjustStock(
                pb.AdjustStockRequest(
                    key=k, delta=-5, reason=pb.ADJUSTMENT_REASON_SALE, idempotency_key="pos-1"
                )
            )
            return await level(stub, k), held.reservation.reservation_id

    before, reservation_id = asyncio.run(write_then_read())
    shard.stop()  # orderly: writes a checkpoint
    shard.start()
    shard.kill()  # no checkpoint: the ledger tail is replayed
    shard.start()

    async def read() -> tuple[pb.StockLevel, pb.Reservation]:
        async with grpc.aio.insecure_channel(shard.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            found = await stub.GetReservation(
                pb.GetReservationRequest(merchant_id="m-1", reservation_id=reservation_id)
            )
            return await level(stub, key("eggs", "store-9")), found.reservation

    after, reservation = asyncio.run(read())
    assert after == before
    assert (after.on_hand, after.reserved, after.available) == (35, 7, 28)
    assert reservation.state == pb.RESERVATION_STATE_ACTIVE
