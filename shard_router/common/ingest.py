"""The Ingest service, for shard and router alike: split a feed's request by partition, have
each part applied by its owner, and merge the acknowledgements back in request order.

    refused, parts = split(request)          # Refusal: the request as a whole is malformed
    answers = [await apply(part) ...]        # the shard asks its owner, the router forwards
    response = merge(request, refused, parts, answers)

A request names one merchant and any of its keys, so it may span partitions (a merchant's
locations); a store's gateway usually sends one location, which is one part, forwarded as
it came; a heartbeat's locations (``alive_at``) join the parts of their partitions.
Routing reads only the key's merchant and location: an event of another
merchant's key is refused here, with the core's own check and reason; every other check
(a malformed key included) is the owner's (``inventory_core``). A part that gets no answer
has each of its events acknowledged FAILED with the status, whose class says whether it
may have been applied: sending the events again is always safe, since they are
de-duplicated by event id. A request of one partition (what a router forwards) that gets
no answer fails as a whole, with the status itself, so that the router retries a redirect
as it does any call.

``serve_stream`` answers an ``Ingest.Stream``: each request as its own call, at most
``STREAM_REQUESTS_IN_FLIGHT_MAX`` at once, answered in the order they finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import (
    InventoryKey,
    partition_of,
    validate_feed_key,
    validate_ingest_request,
)

from . import convert, errors
from .calls import CALL_TIMEOUT_S_DEFAULT, Refusal, check, refusal_status

log = structlog.get_logger(__name__)

# Requests of one Ingest.Stream in progress at once: enough to keep a gateway's pipeline
# full while earlier requests flush, and a bound on what one stream holds (16 x 1000
# events).
STREAM_REQUESTS_IN_FLIGHT_MAX = 16

Apply = Callable[["Part", float], Awaitable["pb.IngestResponse | status_pb2.Status"]]


@dataclass(slots=True)
class Part:
    """The events of one partition: their positions in the request, its heartbeat's
    locations, and the request to send."""

    partition: int
    indexes: list[int] = field(default_factory=list)
    alive_at: list[str] = field(default_factory=list)
    request: pb.IngestRequest = field(default_factory=pb.IngestRequest)


def split(request: pb.IngestRequest) -> tuple[dict[int, pb.EventAck], list[Part]]:
    """The events refused for their routing fields, and the rest by partition (first-seen
    order). Raises ``Refusal`` when the request as a whole is malformed.

    Routing reads only the merchant (it must be the request's) and the location (the
    partition is hashed once per location); every other check is the owner's.
    """
    merchant_id = request.merchant_id
    events = request.events
    check(
        validate_ingest_request(
            merchant_id, request.source, len(events), request.batch_id, request.alive_at
        )
    )
    refused: dict[int, pb.EventAck] = {}
    parts: dict[int, Part] = {}
    by_location: dict[str, Part] = {}

    def part_of(location_id: str) -> Part:
        part = by_location.get(location_id)
        if part is None:
            partition = partition_of(merchant_id, location_id)
            part = parts.get(partition)
            if part is None:
                part = parts[partition] = Part(partition)
            by_location[location_id] = part
        return part

    for index, event in enumerate(events):
        proto_key = event.key
        if proto_key.merchant_id != merchant_id:
            refused[index] = _unroutable(proto_key, merchant_id)
            continue
        part_of(proto_key.location_id).indexes.append(index)
    for location_id in dict.fromkeys(request.alive_at):
        part_of(location_id).alive_at.append(location_id)
    if len(parts) == 1 and not refused:  # one location, as a store sends: forward it as is
        (part,) = parts.values()
        part.request = request
        return refused, [part]
    for part in parts.values():
        sub = part.request
        sub.merchant_id, sub.source, sub.batch_id = merchant_id, request.source, request.batch_id
        sub.events.extend(events[i] for i in part.indexes)
        sub.alive_at.extend(part.alive_at)
    return refused, list(parts.values())


def _unroutable(proto_key: pb.InventoryKey, merchant_id: str) -> pb.EventAck:
    key = InventoryKey(proto_key.merchant_id, proto_key.sku_id, proto_key.location_id)
    problem = validate_feed_key(key, merchant_id)
    assert problem is not None, "a key of another merchant is refused"
    return convert.refused_ack(problem.field, problem.reason)


def merge(
    request: pb.IngestRequest,
    refused: dict[int, pb.EventAck],
    parts: Sequence[Part],
    answers: Sequence[pb.IngestResponse | status_pb2.Status],
) -> pb.IngestResponse:
    """One acknowledgement per event of ``request``, in its order."""
    acks: list[pb.EventAck | None] = [None] * len(request.events)
    for index, ack in refused.items():
        acks[index] = ack
    response = pb.IngestResponse(sequence=request.sequence)
    for part, answer in zip(parts, answers, strict=True):
        if isinstance(answer, status_pb2.Status):
            failed = pb.EventAck(status=pb.EVENT_ACK_STATUS_FAILED, error=answer)
            for index in part.indexes:
                acks[index] = failed
            continue
        if len(answer.acks) != len(part.indexes):
            raise AssertionError(f"{len(answer.acks)} acks for {len(part.indexes)} events")
        for index, ack in zip(part.indexes, answer.acks, strict=True):
            acks[index] = ack
        response.over_committed.extend(answer.over_committed)
    assert all(ack is not None for ack in acks), "an event left unanswered"
    response.acks.extend(acks)  # type: ignore[arg-type]
    return response


async def ingest(
    request: pb.IngestRequest, deadline: float | None, apply: Apply
) -> pb.IngestResponse:
    """Split, apply every part at once (``apply(part, deadline)``), merge."""
    refused, parts = split(request)
    when = time.monotonic() + CALL_TIMEOUT_S_DEFAULT if deadline is None else deadline
    if len(parts) == 1:
        answer = await apply(parts[0], when)
        if isinstance(answer, status_pb2.Status) and not refused:
            # The request was one partition's: its failure is the call's, so that whoever
            # forwarded it sees the status itself (a router retries a redirect).
            raise Refusal(answer)
        answers = [answer]
    else:
        answers = list(await asyncio.gather(*(apply(part, when) for part in parts)))
    return merge(request, refused, parts, answers)


# ---------------------------------------------------------------------- the stream


async def serve_stream(
    requests: AsyncIterator[pb.IngestRequest],
    call: Callable[[pb.IngestRequest, float | None], Awaitable[pb.IngestResponse]],
    *,
    in_flight_max: int = STREAM_REQUESTS_IN_FLIGHT_MAX,
) -> AsyncIterator[pb.IngestResponse]:
    """Answer each request of an Ingest.Stream as its own call, in the order they finish.

    A request refused as a whole (or failing) is answered with its ``error`` and no acks.
    At most ``in_flight_max`` requests are in progress or answered and not yet taken by
    gRPC; past that the stream reads no more requests. The stream ends when the sender has
    closed its side and every request read has been answered.
    """
    answers: asyncio.Queue[pb.IngestResponse | None] = asyncio.Queue()
    room = asyncio.Semaphore(in_flight_max)

    async def answer(request: pb.IngestRequest) -> None:
        deadline = time.monotonic() + CALL_TIMEOUT_S_DEFAULT
        try:
            response = await call(request, deadline)
        except Exception as error:
            status = refusal_status(error)
            if status is None:
                log.exception("ingest_request_failed")
                status = errors.internal(f"internal error: {error!r}", mutating=True)
            response = pb.IngestResponse(sequence=request.sequence, error=status)
        answers.put_nowait(response)

    async def read() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                async for request in requests:
                    await room.acquire()
                    group.create_task(answer(request))
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (response := await answers.get()) is not None:
            yield response
            room.release()  # gRPC took it
        await reader  # its failure, if it failed
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
