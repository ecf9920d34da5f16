"""Serving the ``Inventory.Batch`` stream (shard and router alike).

Each request read from the stream is handed, in chunks of at most ``BATCH_ITEMS_MAX``
items, to an ``ItemHandler``, which must answer every item exactly once through the
``answer`` callback it is given: at once, from a callback of its own, or from a task it
starts in the stream's task group. Results are written back as they become ready, several
per ``BatchResponse``, matched to items by id. Two handlers exist:
  - ``tasks_per_item`` (``serve_stream``, the shard's): every item runs as its own task
    through the calls object, so the items of a request reach the owner together and are
    applied in one pump batch;
  - the router's (shard_router.router.service), which forwards items to their owners by
    callback, with no task per item, and uses ``tasks_per_item`` for the rest.
Every item has its own deadline (``timeout_ms`` from when its request was read, else
``ITEM_TIMEOUT_S_DEFAULT``) and its own answer: a refusal is that item's ``error`` status,
exactly what the unary call would return, and a bug is answered INTERNAL from the error
table.

Back-pressure, not growth: an item is held from the moment its request is read until its
result has been written to the stream. At most ``STREAM_ITEMS_HELD_MAX`` items are held per
stream; when that many are, the stream stops reading requests until results are written.
A caller that stops reading its responses therefore stops being read itself (HTTP/2 flow
control pushes back on its writes); it never grows this process past the bound. The stream
ends when the caller has closed its side and every item read has been answered and written.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import Invalid

from . import calls, errors, rpcs, tracing

log = structlog.get_logger(__name__)

# The oneof fields of BatchItem; the calls object has a method of the same name for each.
CALL_FIELDS = tuple(rpc.field for rpc in rpcs.CALLS)
# Items per BatchRequest: bounds one message and one handler call's fan-out.
BATCH_ITEMS_MAX = 1000
# Items held per stream: running, or answered and waiting to be written. Past it the stream
# reads no more requests until results are written. Measured (upb protobuf): a one-line
# reserve costs ~4.5 KiB held (request and result ~3.2 KiB, its task ~1.3 KiB), so ~18 MiB
# per stream; a 100-line one ~60 KiB, so a stream of only those is bounded at ~240 MiB.
# Twice what the client keeps on the wire (4 requests of 500 items), so its next request is
# read while the previous ones are answered.
STREAM_ITEMS_HELD_MAX = 4_000
# An item without timeout_ms gets this long, like a unary call without a deadline.
ITEM_TIMEOUT_S_DEFAULT = calls.CALL_TIMEOUT_S_DEFAULT
# The kind counted for an item with no call set (or an id sent twice while in flight).
UNKNOWN_KIND = "none"


class ItemCounter(Protocol):
    def count(self, kind: str, code: int) -> None: ...


# Every item answered is counted into this, by kind and code, once the process exports
# metrics (set by shard_router.common.metrics; none: nothing is counted).
item_counter: ItemCounter | None = None

Call = Callable[[Any, float | None], Awaitable[Any]]
Answer = Callable[[pb.BatchItemResult], None]
# handler(items, received_at, answer, group): see the module docstring.
ItemHandler = Callable[[Sequence[pb.BatchItem], float, Answer, asyncio.TaskGroup], None]


def dispatch_table(calls_object: object) -> dict[str, Call]:
    """Each Batch call's method of ``calls_object``; a call it lacks answers UNIMPLEMENTED."""
    return {name: getattr(calls_object, name, _unimplemented(name)) for name in CALL_FIELDS}


def _unimplemented(name: str) -> Call:
    async def refuse(request: object, deadline: float | None) -> object:
        raise calls.Refusal(errors.unimplemented(f"{name} is not served here"))

    return refuse


def item_deadline(item: pb.BatchItem, received_at: float) -> float:
    """When the item's time is up (``time.monotonic()``), counted from its request's read."""
    timeout_s = item.timeout_ms / 1000 if item.timeout_ms else ITEM_TIMEOUT_S_DEFAULT
    return received_at + timeout_s


async def run_item(
    item: pb.BatchItem,
    dispatch: dict[str, Call],
    refusal_status: Callable[[Exception], status_pb2.Status | None],
    received_at: float | None = None,
) -> pb.BatchItemResult:
    name = item.WhichOneof("call")
    if name is None:
        invalid = Invalid("items[].call", "one call must be set")
        return pb.BatchItemResult(id=item.id, error=errors.rejection_to_status(invalid))
    started = time.monotonic() if received_at is None else received_at
    request = getattr(item, name)
    call = dispatch[name](request, item_deadline(item, started))
    metadata = calls.propagated(item.metadata.items()) if item.metadata else {}
    span = tracing.item_span(name, metadata, request)
    try:
        response = await calls.with_metadata(metadata, tracing.within(span, call))
    except Exception as error:
        status = refusal_status(error)
        if status is None:
            log.exception("batch_item_failed", call=name)
            message = f"internal error: {error!r}"
            status = errors.internal(message, mutating=rpcs.is_mutating(name))
        result = pb.BatchItemResult(id=item.id, error=status)
    else:
        result = pb.BatchItemResult(id=item.id)
        getattr(result, name).CopyFrom(response)
    tracing.end_item(span, result, metadata)
    return result


def tasks_per_item(
    dispatch: dict[str, Call],
    refusal_status: Callable[[Exception], status_pb2.Status | None],
) -> ItemHandler:
    """The handler that runs every item as its own task through ``dispatch``."""

    async def run(item: pb.BatchItem, received_at: float, answer: Answer) -> None:
        answer(await run_item(item, dispatch, refusal_status, received_at))

    def handle(
        items: Sequence[pb.BatchItem],
        received_at: float,
        answer: Answer,
        group: asyncio.TaskGroup,
    ) -> None:
        for item in items:
            group.create_task(run(item, received_at, answer))

    return handle


def serve_stream(
    requests: AsyncIterator[pb.BatchRequest],
    dispatch: dict[str, Call],
    refusal_status: Callable[[Exception], status_pb2.Status | None],
    *,
    items_held_max: int = STREAM_ITEMS_HELD_MAX,
) -> AsyncIterator[pb.BatchResponse]:
    """Answer every item of the stream with a task per item (``tasks_per_item``)."""
    handler = tasks_per_item(dispatch, refusal_status)
    return serve_items(requests, handler, items_held_max=items_held_max)


async def serve_items(
    requests: AsyncIterator[pb.BatchRequest],
    handler: ItemHandler,
    *,
    items_held_max: int = STREAM_ITEMS_HELD_MAX,
) -> AsyncIterator[pb.BatchResponse]:
    """Answer every item of the stream through ``handler``; stops when the sender closes
    and all items are answered.

    Results leave as soon as they are ready: whatever was answered while the previous
    response was being written goes out together, so one slow item never holds back the
    others. An item stays held (counted against ``items_held_max``) until the response
    carrying its result has been taken by gRPC, so results waiting to be written are bounded
    too. The task group lives until every item read has been answered, so a handler may
    start a task for an item at any time before it answers it.
    """
    assert items_held_max >= BATCH_ITEMS_MAX, items_held_max
    served = _Served(handler, items_held_max)
    reader = asyncio.create_task(served.read(requests))
    try:
        while True:
            if served.ready:
                results = served.take()
                yield pb.BatchResponse(results=results)
                served.written(len(results))  # gRPC took the response: no longer ours
                continue
            if reader.done():
                break
            served.readable.clear()
            await served.readable.wait()
        await reader  # its failure, if it failed
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


class _Served:
    """The items of one stream between being read and being written (``serve_items``)."""

    def __init__(self, handler: ItemHandler, items_held_max: int) -> None:
        self._handler = handler
        self._items_held_max = items_held_max
        self.ready: deque[pb.BatchItemResult] = deque()
        self.readable = asyncio.Event()  # a result is ready, or the reader has finished
        self._room = asyncio.Event()
        self._settled = asyncio.Event()
        self._held = 0  # read and not yet written
        self._unanswered = 0  # read and not yet answered
        # The kind of each item read and not yet answered, by id, when the process counts
        # items (``item_counter``): held items only, so within items_held_max.
        self._counter = item_counter
        self._kinds: dict[int, str] | None = {} if item_counter is not None else None

    def answer(self, result: pb.BatchItemResult) -> None:
        self._unanswered -= 1
        assert self._unanswered >= 0, "an item was answered twice"
        if self._counter is not None and self._kinds is not None:
            code = result.error.code if result.WhichOneof("result") == "error" else 0
            self._counter.count(self._kinds.pop(result.id, UNKNOWN_KIND), code)
        self.ready.append(result)
        self.readable.set()
        if self._unanswered == 0:
            self._settled.set()

    def take(self) -> list[pb.BatchItemResult]:
        count = min(len(self.ready), BATCH_ITEMS_MAX)
        return [self.ready.popleft() for _ in range(count)]

    def written(self, count: int) -> None:
        self._held -= count
        self._room.set()

    async def read(self, requests: AsyncIterator[pb.BatchRequest]) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                async for request in requests:
                    received_at = time.monotonic()
                    items = request.items
                    for chunk in _chunks(items):
                        await self._hold(len(chunk))
                        if self._kinds is not None:
                            for item in chunk:
                                self._kinds[item.id] = item.WhichOneof("call") or UNKNOWN_KIND
                        if len(items) > BATCH_ITEMS_MAX:
                            for result in _oversized(chunk, len(items)):
                                self.answer(result)
                            continue
                        self._handler(chunk, received_at, self.answer, group)
                while self._unanswered:
                    await self._settled.wait()
        finally:
            self.readable.set()

    async def _hold(self, count: int) -> None:
        while self._held + count > self._items_held_max:
            self._room.clear()
            await self._room.wait()
        self._held += count
        self._unanswered += count
        self._settled.clear()


def _chunks(items: Sequence[pb.BatchItem]) -> list[Sequence[pb.BatchItem]]:
    return [items[i : i + BATCH_ITEMS_MAX] for i in range(0, len(items), BATCH_ITEMS_MAX)]


def _oversized(chunk: Sequence[pb.BatchItem], count: int) -> list[pb.BatchItemResult]:
    """Every item of a request over BATCH_ITEMS_MAX is refused (the request as a whole is)."""
    invalid = Invalid("items", f"at most {BATCH_ITEMS_MAX} per BatchRequest, got {count}")
    status = errors.rejection_to_status(invalid)
    return [pb.BatchItemResult(id=item.id, error=status) for item in chunk]
