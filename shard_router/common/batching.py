"""Serving the ``Inventory.Batch`` stream over a set of calls (shard and router alike).

Every item read from the stream runs as its own task, so the items of a request reach the
owner together and are applied in one pump batch; results are written back as they become
ready, several per ``BatchResponse``, matched to items by id. Every item has its own
deadline (``timeout_ms`` from when its request was read, else ``ITEM_TIMEOUT_S_DEFAULT``)
and its own answer: a refusal is that item's ``error`` status, exactly what the unary call
would return, and a bug is answered INTERNAL from the error table.

Back-pressure, not growth: an item is held from the moment its request is read until its
result has been written to the stream. At most ``STREAM_ITEMS_HELD_MAX`` items are held per
stream; when that many are, the stream stops reading requests until results are written.
A caller that stops reading its responses therefore stops being read itself (HTTP/2 flow
control pushes back on its writes); it never grows this process past the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import structlog
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import Invalid

from . import calls, errors, rpcs

log = structlog.get_logger(__name__)

# The oneof fields of BatchItem; the calls object has a method of the same name for each.
CALL_FIELDS = tuple(rpc.field for rpc in rpcs.CALLS)
# Items per BatchRequest: bounds one message and one task's fan-out.
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

Call = Callable[[Any, float | None], Awaitable[Any]]


def dispatch_table(calls_object: object) -> dict[str, Call]:
    """Each Batch call's method of ``calls_object``; a call it lacks answers UNIMPLEMENTED."""
    return {name: getattr(calls_object, name, _unimplemented(name)) for name in CALL_FIELDS}


def _unimplemented(name: str) -> Call:
    async def refuse(request: object, deadline: float | None) -> object:
        raise calls.Refusal(errors.unimplemented(f"{name} is not served here"))

    return refuse


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
    timeout_s = item.timeout_ms / 1000 if item.timeout_ms else ITEM_TIMEOUT_S_DEFAULT
    started = time.monotonic() if received_at is None else received_at
    call = dispatch[name](getattr(item, name), started + timeout_s)
    try:
        response = await calls.with_metadata(calls.propagated(item.metadata.items()), call)
    except Exception as error:
        status = refusal_status(error)
        if status is None:
            log.exception("batch_item_failed", call=name)
            message = f"internal error: {error!r}"
            status = errors.internal(message, mutating=rpcs.is_mutating(name))
        return pb.BatchItemResult(id=item.id, error=status)
    result = pb.BatchItemResult(id=item.id)
    getattr(result, name).CopyFrom(response)
    return result


async def serve_stream(
    requests: AsyncIterator[pb.BatchRequest],
    dispatch: dict[str, Call],
    refusal_status: Callable[[Exception], status_pb2.Status | None],
    *,
    items_held_max: int = STREAM_ITEMS_HELD_MAX,
) -> AsyncIterator[pb.BatchResponse]:
    """Answer every item of the stream; stops when the sender closes and all are answered.

    Results leave as soon as they are ready: whatever finished while the previous response
    was being written goes out together, so one slow item never holds back the others. An
    item stays held (counted against ``items_held_max``) until the response carrying its
    result has been taken by gRPC, so results waiting to be written are bounded too.
    """
    assert items_held_max >= BATCH_ITEMS_MAX, items_held_max
    ready: asyncio.Queue[pb.BatchItemResult | None] = asyncio.Queue()
    held = 0
    room = asyncio.Event()

    async def answer(item: pb.BatchItem, received_at: float) -> None:
        ready.put_nowait(await run_item(item, dispatch, refusal_status, received_at))

    async def hold(count: int) -> None:
        nonlocal held
        while held + count > items_held_max:
            room.clear()
            await room.wait()
        held += count

    async def read() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                async for request in requests:
                    received_at = time.monotonic()
                    items = list(request.items)
                    for chunk in _chunks(items):
                        await hold(len(chunk))
                        if len(items) > BATCH_ITEMS_MAX:
                            for result in _oversized(chunk, len(items)):
                                ready.put_nowait(result)
                            continue
                        for item in chunk:
                            group.create_task(answer(item, received_at))
        finally:
            ready.put_nowait(None)  # the task group waited for every item (or failed)

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
            held -= len(results)  # gRPC took the response: these are no longer ours
            room.set()
        await reader
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def _chunks(items: Sequence[pb.BatchItem]) -> list[Sequence[pb.BatchItem]]:
    return [items[i : i + BATCH_ITEMS_MAX] for i in range(0, len(items), BATCH_ITEMS_MAX)]


def _oversized(chunk: Sequence[pb.BatchItem], count: int) -> list[pb.BatchItemResult]:
    """Every item of a request over BATCH_ITEMS_MAX is refused (the request as a whole is)."""
    invalid = Invalid("items", f"at most {BATCH_ITEMS_MAX} per BatchRequest, got {count}")
    status = errors.rejection_to_status(invalid)
    return [pb.BatchItemResult(id=item.id, error=status) for item in chunk]
