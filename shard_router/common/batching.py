"""Serving the ``Inventory.Batch`` stream over a set of calls (shard and router alike).

Every item read from the stream runs as its own task, so the items of a request reach the
owner together and are applied in one pump batch; results are written back as they become
ready, several per ``BatchResponse``, matched to items by id. Every item has
its own deadline (``timeout_ms``, else ``item_timeout_s_default``) and its own answer: a
refusal is that item's ``error`` status, exactly what the unary call would return.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

from . import calls, errors

log = structlog.get_logger(__name__)

# The oneof fields of BatchItem; the calls object has a method of the same name for each.
CALL_FIELDS = (
    "get_availability",
    "reserve",
    "commit",
    "release",
    "extend_reservation",
    "get_reservation",
    "adjust_stock",
    "set_stock",
    "set_safety_stock",
)
# Items per BatchRequest: bounds one message and one task's fan-out.
BATCH_ITEMS_MAX = 1000
# Items in flight on one stream; past it, new items are refused RESOURCE_EXHAUSTED at once
# (back-pressure to the sender rather than an unbounded backlog).
STREAM_ITEMS_IN_FLIGHT_MAX = 20_000
# An item without timeout_ms gets this long, like a unary call with a 10 s deadline.
ITEM_TIMEOUT_S_DEFAULT = 10.0

Call = Callable[[Any, float | None], Awaitable[Any]]


def dispatch_table(calls: object) -> dict[str, Call]:
    return {name: getattr(calls, name) for name in CALL_FIELDS}


async def run_item(
    item: pb.BatchItem,
    dispatch: dict[str, Call],
    refusal_status: Callable[[Exception], status_pb2.Status | None],
) -> pb.BatchItemResult:
    name = item.WhichOneof("call")
    if name is None:
        message = "items[].call: one call must be set"
        return pb.BatchItemResult(
            id=item.id, error=errors.status(grpc.StatusCode.INVALID_ARGUMENT, message)
        )
    timeout_s = item.timeout_ms / 1000 if item.timeout_ms else ITEM_TIMEOUT_S_DEFAULT
    call = dispatch[name](getattr(item, name), time.monotonic() + timeout_s)
    try:
        response = await calls.with_metadata(calls.propagated(item.metadata.items()), call)
    except Exception as error:
        status = refusal_status(error)
        if status is None:
            log.exception("batch_item_failed", call=name)
            status = errors.status(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")
        return pb.BatchItemResult(id=item.id, error=status)
    result = pb.BatchItemResult(id=item.id)
    getattr(result, name).CopyFrom(response)
    return result


async def serve_stream(
    requests: AsyncIterator[pb.BatchRequest],
    dispatch: dict[str, Call],
    refusal_status: Callable[[Exception], status_pb2.Status | None],
) -> AsyncIterator[pb.BatchResponse]:
    """Answer every item of the stream; stops when the sender closes and all are answered.

    Results leave as soon as they are ready: whatever finished while the previous response
    was being written goes out together, so one slow item never holds back the others.
    """
    ready: asyncio.Queue[pb.BatchItemResult | None] = asyncio.Queue()
    in_flight = 0

    async def answer(item: pb.BatchItem) -> None:
        nonlocal in_flight
        try:
            ready.put_nowait(await run_item(item, dispatch, refusal_status))
        finally:
            in_flight -= 1

    async def read() -> None:
        nonlocal in_flight
        async with asyncio.TaskGroup() as group:
            async for request in requests:
                admitted, refused = _admit(request.items, STREAM_ITEMS_IN_FLIGHT_MAX - in_flight)
                for result in refused:
                    ready.put_nowait(result)
                in_flight += len(admitted)
                for item in admitted:
                    group.create_task(answer(item))
        ready.put_nowait(None)  # every item answered: the task group waited for them

    reader = asyncio.create_task(read())
    try:
        while (first := await ready.get()) is not None:
            results = [first]
            while len(results) < BATCH_ITEMS_MAX and not ready.empty():
                following = ready.get_nowait()
                if following is None:
                    ready.put_nowait(None)
                    break
                results.append(following)
            yield pb.BatchResponse(results=results)
        await reader
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def _admit(items: Any, room: int) -> tuple[list[pb.BatchItem], list[pb.BatchItemResult]]:
    items = list(items)
    if len(items) > BATCH_ITEMS_MAX:
        message = f"items: at most {BATCH_ITEMS_MAX} per BatchRequest, got {len(items)}"
        status = errors.status(grpc.StatusCode.INVALID_ARGUMENT, message)
        return [], [pb.BatchItemResult(id=i.id, error=status) for i in items]
    if len(items) > room:
        message = f"{STREAM_ITEMS_IN_FLIGHT_MAX} items already in flight on this stream"
        status = errors.status(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return items[:room], [pb.BatchItemResult(id=i.id, error=status) for i in items[room:]]
    return items, []
