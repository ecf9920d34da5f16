"""A small driver for the ``Inventory.Batch`` stream: many calls per message.

How it works: ``call(item)`` queues the item and awaits its result. One sender task writes
whatever is queued as one ``BatchRequest`` of up to ``items_max`` items whenever fewer than
``in_flight_messages_max`` messages are unanswered (so calls coalesce while one is in flight,
like Nagle). One receiver task matches results to callers by ``id`` (results may come in any
order and split over several messages). When the stream fails, every waiting call gets the
stream's status code (UNIMPLEMENTED when the server has no Batch yet) and so do later calls:
the driver does not reconnect; the caller opens a new one.

Bounds: ``pending_items_max`` queued or unanswered calls (beyond it a call is answered
RESOURCE_EXHAUSTED locally: back-pressure, not buffering); each call waits at most its
timeout plus ``RESULT_GRACE_S`` for its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque

import grpc
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

# The API's limit on items per BatchRequest.
BATCH_ITEMS_MAX = 1000
# Calls queued or in flight on one driver; 100k covers any closed loop the harness runs.
PENDING_ITEMS_MAX = 100_000
# How long past an item's own timeout the driver waits before answering DEADLINE_EXCEEDED.
RESULT_GRACE_S = 5.0

CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}
CODE_NUMBERS: dict[str, int] = {code.name: code.value[0] for code in grpc.StatusCode}


def error_result(code: str, message: str) -> pb.BatchItemResult:
    return pb.BatchItemResult(error=status_pb2.Status(code=CODE_NUMBERS[code], message=message))


def result_code(result: pb.BatchItemResult) -> str:
    """ "OK" or the status code name of a failed item."""
    if result.WhichOneof("result") == "error":
        return CODE_NAMES.get(result.error.code, "UNKNOWN")
    return "OK"


class BatchDriver:
    """Coalesces concurrent calls into ``BatchRequest`` messages on one stream."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        items_max: int = BATCH_ITEMS_MAX,
        in_flight_messages_max: int = 1,
        timeout_s: float = 10.0,
        pending_items_max: int = PENDING_ITEMS_MAX,
    ) -> None:
        if not 1 <= items_max <= BATCH_ITEMS_MAX:
            raise ValueError(f"items_max must be 1 to {BATCH_ITEMS_MAX}")
        self._stub = pb_grpc.InventoryStub(channel)
        self._items_max = items_max
        self._in_flight_messages_max = max(1, in_flight_messages_max)
        self._timeout_s = timeout_s
        self._pending_items_max = pending_items_max
        self._queued: deque[tuple[pb.BatchItem, asyncio.Future[pb.BatchItemResult]]] = deque()
        self._waiting: dict[int, asyncio.Future[pb.BatchItemResult]] = {}
        self._message_of_item: dict[int, int] = {}
        self._unanswered_items_of_message: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._failed_code: str | None = None
        self._stream: grpc.aio.StreamStreamCall[pb.BatchRequest, pb.BatchResponse] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.messages_sent = 0
        self.items_sent = 0

    @property
    def failed_code(self) -> str | None:
        return self._failed_code

    def start(self) -> None:
        self._stream = self._stub.Batch()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="batch-send"),
            asyncio.create_task(self._receive_loop(), name="batch-receive"),
        ]

    async def call(self, item: pb.BatchItem) -> pb.BatchItemResult:
        """Send ``item`` (its id is assigned here) and return its result; never raises."""
        if self._failed_code is not None:
            return error_result(self._failed_code, "batch stream failed")
        if len(self._queued) + len(self._waiting) >= self._pending_items_max:
            return error_result("RESOURCE_EXHAUSTED", "batch driver pending_items_max")
        item.timeout_ms = int(self._timeout_s * 1000)
        future: asyncio.Future[pb.BatchItemResult] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        self._wake.set()
        try:
            return await asyncio.wait_for(future, self._timeout_s + RESULT_GRACE_S)
        except TimeoutError:
            return error_result("DEADLINE_EXCEEDED", "no result from the batch stream")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await task
        if self._stream is not None:
            self._stream.cancel()
        self._fail("CANCELLED")

    async def _send_loop(self) -> None:
        assert self._stream is not None
        try:
            while self._failed_code is None:
                await self._wake.wait()
                self._wake.clear()
                while self._queued and len(self._unanswered_items_of_message) < (
                    self._in_flight_messages_max
                ):
                    await self._stream.write(pb.BatchRequest(items=self._take()))
        except grpc.aio.AioRpcError as error:
            self._fail(error.code().name)
        except (grpc.RpcError, RuntimeError):
            self._fail("UNAVAILABLE")  # written after the call ended: the receiver says why

    def _take(self) -> list[pb.BatchItem]:
        message_id = next(self._message_ids)
        items: list[pb.BatchItem] = []
        while self._queued and len(items) < self._items_max:
            item, future = self._queued.popleft()
            if future.done():
                continue  # its caller gave up
            item.id = next(self._ids)
            self._waiting[item.id] = future
            self._message_of_item[item.id] = message_id
            items.append(item)
        if items:
            self._unanswered_items_of_message[message_id] = len(items)
            self.messages_sent += 1
            self.items_sent += len(items)
        return items

    async def _receive_loop(self) -> None:
        assert self._stream is not None
        try:
            while True:
                response = await self._stream.read()
                if response is grpc.aio.EOF:
                    self._fail("UNAVAILABLE")
                    return
                assert isinstance(response, pb.BatchResponse)
                for result in response.results:
                    self._answer(result)
        except grpc.aio.AioRpcError as error:
            self._fail(error.code().name)

    def _answer(self, result: pb.BatchItemResult) -> None:
        future = self._waiting.pop(result.id, None)
        message_id = self._message_of_item.pop(result.id, None)
        if message_id is not None:
            self._unanswered_items_of_message[message_id] -= 1
            if self._unanswered_items_of_message[message_id] == 0:
                del self._unanswered_items_of_message[message_id]
                self._wake.set()
        if future is not None and not future.done():
            future.set_result(result)

    def _fail(self, code: str) -> None:
        if self._failed_code is None:
            self._failed_code = code
        failed = error_result(self._failed_code, "batch stream failed")
        for future in [*self._waiting.values(), *(f for _, f in self._queued)]:
            if not future.done():
                future.set_result(failed)
        self._waiting.clear()
        self._queued.clear()
        self._wake.set()
