"""This service (or anything speaking its API, like the echo ceiling) over gRPC.

``UnaryClient`` makes one unary call per operation; ``BatchClient`` sends every operation as
an item of the ``Batch`` stream through ``BatchDriver``. ``ServiceTarget`` loads the
catalogue with SetStock over the Batch stream (unary calls when the server has no Batch)
and reads levels (GetAvailability, STRONG) and reservations (GetReservation) for the audit.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from ..workloads import Catalogue, Key
from . import OK, Answer, Level, ReservationRef, ReservationState, TargetSpec
from .batch import BatchDriver, result_code

# GetAvailability takes 1 to 1000 keys.
AVAILABILITY_KEYS_MAX = 1000
# Loading over Batch: SetStock items per BatchRequest and messages unanswered at once
# (2,000 items, well under the server's 20,000 per stream; measured on 2 cores: as fast as
# 1000 x 2 and faster than 250 x 8). Over unary calls (the fallback): calls in flight.
LOAD_ITEMS_PER_MESSAGE = 500
LOAD_MESSAGES_IN_FLIGHT_MAX = 4
LOAD_UNARY_CALLS_IN_FLIGHT_MAX = 64
# GetReservation calls in flight during the audit.
AUDIT_CALLS_IN_FLIGHT_MAX = 64
# Where the load's progress is printed, every this many rows.
LOAD_PROGRESS_ROWS = 100_000

STATES = {
    pb.RESERVATION_STATE_ACTIVE: ReservationState.ACTIVE,
    pb.RESERVATION_STATE_COMMITTED: ReservationState.COMMITTED,
    pb.RESERVATION_STATE_RELEASED: ReservationState.RELEASED,
    pb.RESERVATION_STATE_EXPIRED: ReservationState.EXPIRED,
}


def key_to_proto(key: Key) -> pb.InventoryKey:
    return pb.InventoryKey(
        merchant_id=key.merchant_id, sku_id=key.sku_id, location_id=key.location_id
    )


def reserve_request(
    lines: Sequence[tuple[Key, int]], ttl_s: int, idempotency_key: str
) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        lines=[pb.ReservationLine(key=key_to_proto(k), quantity=q) for k, q in lines],
        ttl_s=ttl_s,
        idempotency_key=idempotency_key,
    )


def channel_options() -> list[tuple[str, int]]:
    # Large answers (1000 levels) and many calls on one connection.
    return [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class UnaryClient:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._channel = channel
        self._stub = pb_grpc.InventoryStub(channel)
        self._timeout_s = timeout_s

    @classmethod
    def open(cls, spec: TargetSpec) -> UnaryClient:
        channel = grpc.aio.insecure_channel(spec.address, options=channel_options())
        return cls(channel, spec.call_timeout_s)

    async def _call(self, call: Awaitable[object]) -> grpc.StatusCode | None:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return error.code()
        return None

    async def reserve(
        self, lines: Sequence[tuple[Key, int]], ttl_s: int, idempotency_key: str
    ) -> Answer:
        try:
            answer = await self._stub.Reserve(
                reserve_request(lines, ttl_s, idempotency_key), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            return Answer(error.code().name)
        return Answer(OK, answer.reservation.reservation_id)

    async def commit(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        request = pb.CommitRequest(
            merchant_id=key.merchant_id,
            reservation_id=reservation_id,
            idempotency_key=idempotency_key,
        )
        code = await self._call(self._stub.Commit(request, timeout=self._timeout_s))
        return Answer(code.name if code else OK, reservation_id)

    async def release(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        request = pb.ReleaseRequest(
            merchant_id=key.merchant_id,
            reservation_id=reservation_id,
            idempotency_key=idempotency_key,
        )
        code = await self._call(self._stub.Release(request, timeout=self._timeout_s))
        return Answer(code.name if code else OK, reservation_id)

    async def read(self, keys: Sequence[Key]) -> Answer:
        request = pb.GetAvailabilityRequest(keys=[key_to_proto(k) for k in keys])
        code = await self._call(self._stub.GetAvailability(request, timeout=self._timeout_s))
        return Answer(code.name if code else OK)

    async def close(self) -> None:
        await self._channel.close()


class BatchClient:
    def __init__(self, channel: grpc.aio.Channel, driver: BatchDriver) -> None:
        self._channel = channel
        self.driver = driver

    @classmethod
    async def open(cls, spec: TargetSpec) -> BatchClient:
        channel = grpc.aio.insecure_channel(spec.address, options=channel_options())
        driver = BatchDriver(
            channel,
            items_max=spec.batch_items_max,
            in_flight_messages_max=spec.batch_in_flight_messages_max,
            timeout_s=spec.call_timeout_s,
        )
        driver.start()
        return cls(channel, driver)

    async def reserve(
        self, lines: Sequence[tuple[Key, int]], ttl_s: int, idempotency_key: str
    ) -> Answer:
        result = await self.driver.call(
            pb.BatchItem(reserve=reserve_request(lines, ttl_s, idempotency_key))
        )
        return Answer(result_code(result), result.reserve.reservation.reservation_id)

    async def commit(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        request = pb.CommitRequest(
            merchant_id=key.merchant_id,
            reservation_id=reservation_id,
            idempotency_key=idempotency_key,
        )
        result = await self.driver.call(pb.BatchItem(commit=request))
        return Answer(result_code(result), reservation_id)

    async def release(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        request = pb.ReleaseRequest(
            merchant_id=key.merchant_id,
            reservation_id=reservation_id,
            idempotency_key=idempotency_key,
        )
        result = await self.driver.call(pb.BatchItem(release=request))
        return Answer(result_code(result), reservation_id)

    async def read(self, keys: Sequence[Key]) -> Answer:
        request = pb.GetAvailabilityRequest(keys=[key_to_proto(k) for k in keys])
        result = await self.driver.call(pb.BatchItem(get_availability=request))
        return Answer(result_code(result))

    async def close(self) -> None:
        await self.driver.close()
        await self._channel.close()


async def probe_batch(address: str, timeout_s: float = 10.0) -> str | None:
    """None when ``address`` serves the Batch stream, else why not (e.g. "UNIMPLEMENTED")."""
    async with grpc.aio.insecure_channel(address) as channel:
        driver = BatchDriver(channel, timeout_s=timeout_s)
        driver.start()
        try:
            probe = pb.GetAvailabilityRequest(
                keys=[pb.InventoryKey(merchant_id="probe", sku_id="probe", location_id="probe")]
            )
            await driver.call(pb.BatchItem(get_availability=probe))
            return driver.failed_code
        finally:
            await driver.close()


async def bounded_gather(
    calls: Iterable[Callable[[], Awaitable[None]]], in_flight_max: int
) -> None:
    """Run every call, at most ``in_flight_max`` at a time; the first failure raises."""
    in_flight: set[asyncio.Task[None]] = set()

    async def run(call: Callable[[], Awaitable[None]]) -> None:
        await call()

    for call in calls:
        if len(in_flight) >= in_flight_max:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        in_flight.add(asyncio.create_task(run(call)))
    for finished in asyncio.as_completed(in_flight):
        await finished


def _chunks(rows: Iterator[tuple[Key, int]], size: int) -> Iterator[list[tuple[Key, int]]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


class _BatchLoader:
    """SetStock items as whole BatchRequests on one stream, at most
    ``LOAD_MESSAGES_IN_FLIGHT_MAX`` unanswered; no task or future per row, so the load
    generator stays cheap next to the servers. The first failed item fails the load."""

    def __init__(self, stub: pb_grpc.InventoryStub, name: str, total: int, timeout_ms: int) -> None:
        self._call = stub.Batch()
        self._name = name
        self._total = total
        self._timeout_ms = timeout_ms
        self._slots = asyncio.Semaphore(LOAD_MESSAGES_IN_FLIGHT_MAX)
        self._message_of_item: dict[int, int] = {}
        self._unanswered_of_message: dict[int, int] = {}
        self._sent = 0
        self._answered = 0
        self._writing_done = False

    async def run(self, messages: Iterable[Iterable[pb.SetStockRequest]]) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._write(messages))
                group.create_task(self._read())
        finally:
            self._call.cancel()

    async def _write(self, messages: Iterable[Iterable[pb.SetStockRequest]]) -> None:
        item_ids = itertools.count(1)
        for message_id, requests in enumerate(messages):
            await self._slots.acquire()
            items = []
            for request in requests:
                item_id = next(item_ids)
                self._message_of_item[item_id] = message_id
                items.append(
                    pb.BatchItem(id=item_id, timeout_ms=self._timeout_ms, set_stock=request)
                )
            self._unanswered_of_message[message_id] = len(items)
            self._sent += len(items)
            await self._call.write(pb.BatchRequest(items=items))
        self._writing_done = True
        await self._call.done_writing()

    async def _read(self) -> None:
        while not (self._writing_done and self._answered == self._sent):
            response = await self._call.read()
            if response is grpc.aio.EOF:
                if self._writing_done and self._answered == self._sent:
                    return
                raise RuntimeError(
                    f"[{self._name}] the load stream ended after {self._answered} of "
                    f"{self._total} rows"
                )
            assert isinstance(response, pb.BatchResponse)
            for result in response.results:
                self._settle(result)

    def _settle(self, result: pb.BatchItemResult) -> None:
        code = result_code(result)
        if code != OK:
            raise RuntimeError(
                f"[{self._name}] loading a row failed: {code} {result.error.message}"
            )
        message_id = self._message_of_item.pop(result.id)
        self._unanswered_of_message[message_id] -= 1
        if self._unanswered_of_message[message_id] == 0:
            del self._unanswered_of_message[message_id]
            self._slots.release()
        self._answered += 1
        if self._answered % LOAD_PROGRESS_ROWS == 0:
            print(f"[{self._name}] loaded {self._answered}/{self._total} rows", file=sys.stderr)


class ServiceTarget:
    """The service (or the echo ceiling when ``spec.stateful`` is False) at ``spec.address``."""

    def __init__(self, spec: TargetSpec, server_pids: list[int], run_tag: str) -> None:
        self.spec = spec
        self.server_pids = server_pids
        self.unavailable: str | None = None
        self._run_tag = run_tag
        self._channel = grpc.aio.insecure_channel(spec.address, options=channel_options())
        self._stub = pb_grpc.InventoryStub(self._channel)
        self._has_batch = False

    async def prepare(self) -> None:
        failed = await probe_batch(self.spec.address, self.spec.call_timeout_s)
        self._has_batch = failed is None
        if failed is not None and self.spec.kind in ("grpc-batch", "grpc-client"):
            self.unavailable = f"Batch stream: {failed}"

    async def load(self, catalogue: Catalogue) -> None:
        if not self.spec.stateful:
            return
        if not self._has_batch:
            print(
                f"[{self.spec.name}] no Batch stream: loading {catalogue.rows} rows with unary "
                "SetStock (slow for large catalogues)",
                file=sys.stderr,
            )
        await self._set_stock_all(
            ((key, catalogue.stock_per_key) for key in catalogue.all_keys()), catalogue.rows
        )

    async def load_key(self, key: Key, on_hand: int) -> None:
        if self.spec.stateful:
            await self._set_stock_all([(key, on_hand)], 1)

    def _set_stock_request(self, key: Key, on_hand: int) -> pb.SetStockRequest:
        return pb.SetStockRequest(
            key=key_to_proto(key),
            on_hand=on_hand,
            idempotency_key=f"bench-load-{self._run_tag}-{key.location_id}-{key.sku_id}",
        )

    async def _set_stock_all(self, rows: Iterable[tuple[Key, int]], total: int) -> None:
        if self._has_batch:
            await self._set_stock_batched(iter(rows), total)
        else:
            await self._set_stock_unary(rows, total)

    async def _set_stock_batched(self, rows: Iterator[tuple[Key, int]], total: int) -> None:
        requests = (
            (self._set_stock_request(key, on_hand) for key, on_hand in chunk)
            for chunk in _chunks(rows, LOAD_ITEMS_PER_MESSAGE)
        )
        timeout_ms = int(max(self.spec.call_timeout_s, 60.0) * 1000)
        await _BatchLoader(self._stub, self.spec.name, total, timeout_ms).run(requests)

    async def _set_stock_unary(self, rows: Iterable[tuple[Key, int]], total: int) -> None:
        timeout_s = max(self.spec.call_timeout_s, 60.0)
        done = 0

        async def set_stock(key: Key, on_hand: int) -> None:
            nonlocal done
            try:
                await self._stub.SetStock(self._set_stock_request(key, on_hand), timeout=timeout_s)
            except grpc.aio.AioRpcError as error:
                raise RuntimeError(
                    f"[{self.spec.name}] loading {key} failed: {error.code().name}"
                ) from error
            done += 1
            if done % LOAD_PROGRESS_ROWS == 0:
                print(f"[{self.spec.name}] loaded {done}/{total} rows", file=sys.stderr)

        await bounded_gather(
            (functools.partial(set_stock, k, q) for k, q in rows), LOAD_UNARY_CALLS_IN_FLIGHT_MAX
        )

    async def levels(self, keys: Sequence[Key]) -> dict[Key, Level]:
        found: dict[Key, Level] = {}
        for start in range(0, len(keys), AVAILABILITY_KEYS_MAX):
            chunk = keys[start : start + AVAILABILITY_KEYS_MAX]
            answer = await self._stub.GetAvailability(
                pb.GetAvailabilityRequest(
                    keys=[key_to_proto(k) for k in chunk], consistency=pb.CONSISTENCY_STRONG
                ),
                timeout=self.spec.call_timeout_s,
            )
            for key, level in zip(chunk, answer.levels, strict=True):
                found[key] = Level(level.on_hand, level.reserved, level.safety_stock)
        return found

    async def reservation_states(self, refs: Sequence[ReservationRef]) -> dict[str, str | None]:
        states: dict[str, str | None] = {}

        async def get(ref: ReservationRef) -> None:
            try:
                answer = await self._stub.GetReservation(
                    pb.GetReservationRequest(
                        merchant_id=ref.merchant_id, reservation_id=ref.reservation_id
                    ),
                    timeout=self.spec.call_timeout_s,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                states[ref.reservation_id] = None
                return
            states[ref.reservation_id] = STATES.get(answer.reservation.state)

        await bounded_gather((functools.partial(get, r) for r in refs), AUDIT_CALLS_IN_FLIGHT_MAX)
        return states

    async def close(self) -> None:
        await self._channel.close()
