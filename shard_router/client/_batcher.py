"""Many concurrent calls of one process on one long-lived ``Inventory.Batch`` stream.

    call() -> pending queue -> writer: BatchRequest (<= batch_items_max items) -> stream
    stream -> reader: BatchResponse -> results matched by id -> each caller's future

How it works, and its rules:
  1. Gathering: the writer sends whatever is queued as soon as one of the
     ``requests_in_flight_max`` slots is free; items queued while the slots are taken are
     gathered into the next request. A BatchRequest holds its slot until every item of it is
     answered (or given up), so a busy stream carries few large requests, an idle one sends
     each call at once (no added latency).
  2. Each item keeps its own deadline: it is sent with the time it has left (``timeout_ms``),
     answered locally DEADLINE_NOT_APPLIED (retryable) if that ran out before it was sent,
     and given up by its caller ``answer_grace_s`` after its deadline: DEADLINE_PASSED,
     outcome unknown for a mutation (the server answers expired items itself, so this only
     happens when the server is stuck or a flush is slow).
  3. A broken stream (an error, or the server closing it with items pending) answers every
     item of it STREAM_BROKEN (UNAVAILABLE): outcome unknown for a mutation sent on it,
     retryable for one never sent and for a read. The stream is never reused; the next call
     opens a new one.
  4. Bounded: at most ``pending_items_max`` items queued or in flight per stream; past it a
     call raises ``Overloaded`` at once (back-pressure rather than a backlog).
  5. Policy-free: no retries and no interpretation of results. A call returns the
     ``BatchItemResult`` exactly as the server (or rule 2 or 3) gave it, so the client and the
     router each put their own policy on top. Every local answer is a row of the error table
     (shard_router.common.errors) with its class.
  6. Structured: each stream's reader and writer are tasks owned by that stream's run task,
     which the batcher owns; ``close()`` drains the pending items, half-closes the stream and
     cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import structlog
from google.protobuf.message import Message
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from ..common import batching, calls, errors, rpcs, tracing
from ._errors import Overloaded

log = structlog.get_logger(__name__)

# Items per BatchRequest: large enough that a busy stream costs one message per several
# hundred calls, half the server's BATCH_ITEMS_MAX (1000) so a request is never refused whole.
BATCH_ITEMS_MAX_DEFAULT = 500
# BatchRequests outstanding on a stream (pipelining): enough to keep the server's pump busy
# while the previous flush commits; more only makes each request smaller.
REQUESTS_IN_FLIGHT_MAX_DEFAULT = 4
# Items queued or in flight per stream: a few seconds of the fastest shard's throughput. Only
# batch_items_max * requests_in_flight_max (2,000) of them are on the wire at once, within
# the server's STREAM_ITEMS_HELD_MAX (4,000); the rest wait here.
PENDING_ITEMS_MAX_DEFAULT = 50_000
# How long after an item's deadline its caller still waits for the server's own answer
# (DEADLINE_NOT_APPLIED, a definite outcome): a round trip plus one flush.
ANSWER_GRACE_S_DEFAULT = 0.5
# How long close() waits for pending items before cancelling them.
CLOSE_DRAIN_S_MAX_DEFAULT = 10.0
# timeout_ms is a uint32.
TIMEOUT_MS_MAX = 2**32 - 1

_CLOSED = "batcher closed"
_SERVER_CLOSED = "the server closed the stream"
# Ends of a stream that break nothing when no item is pending.
_CLEAN_ENDS = frozenset({_CLOSED, _SERVER_CLOSED})


@dataclass
class BatcherStats:
    """Counters since the batcher was made (all streams)."""

    streams_opened: int = 0
    streams_broken: int = 0
    requests_sent: int = 0
    items_sent: int = 0
    items_answered: int = 0
    # Answered locally: deadline passed before sending, or no answer within the grace.
    items_expired: int = 0
    # Answered UNAVAILABLE because their stream broke.
    items_failed_unavailable: int = 0


@dataclass(eq=False)
class _Flight:
    """One BatchRequest on the wire: it holds a slot until all its items are settled."""

    unsettled: int


@dataclass(eq=False)
class _Item:
    id: int
    field_name: str
    request: Message
    deadline: float  # event-loop time
    future: asyncio.Future[pb.BatchItemResult]
    # Caller metadata to carry along (request id, trace context), if any.
    metadata: dict[str, str] = field(default_factory=dict)
    flight: _Flight | None = field(default=None)


@dataclass(frozen=True)
class _Bounds:
    batch_items_max: int
    requests_in_flight_max: int
    pending_items_max: int


def _error_result(item_id: int, status: status_pb2.Status) -> pb.BatchItemResult:
    return pb.BatchItemResult(id=item_id, error=status)


class _Stream:
    """One Batch call and the items sent or to be sent on it. Broken once, never reused."""

    def __init__(
        self,
        stub: pb_grpc.InventoryStub,
        bounds: _Bounds,
        stats: BatcherStats,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._bounds = bounds
        self._stats = stats
        self._call = stub.Batch(metadata=metadata or None)
        self._queue: deque[_Item] = deque()
        self._in_flight: dict[int, _Item] = {}
        self._queued = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(bounds.requests_in_flight_max)
        self.broken = False
        # Shared by many calls: none of the opening call's metadata, log fields or span.
        self.task = asyncio.create_task(self._run(), context=tracing.detached())

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def enqueue(self, item: _Item) -> None:
        assert not self.broken
        self._queue.append(item)
        self._idle.clear()
        self._queued.set()

    def forget(self, item: _Item) -> None:
        """The caller stopped waiting (gave up or was cancelled); a late answer is dropped."""
        if self._in_flight.pop(item.id, None) is not None:
            self._release(item)
        self._note_idle()

    async def drain(self, timeout_s: float) -> None:
        """Wait until nothing is pending, then half-close; the server ends the stream."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
                if not self.broken:
                    await self._call.done_writing()
                await asyncio.shield(self.task)

    async def _run(self) -> None:
        writer = asyncio.create_task(self._write())
        reader = asyncio.create_task(self._read())
        reason = _CLOSED
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            reason = _reason(done.pop())
        finally:
            self.broken = True
            writer.cancel()
            reader.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            self._call.cancel()
            self._fail_all(reason)

    async def _write(self) -> None:
        while True:
            await self._slots.acquire()
            items = await self._take()
            if not items:
                self._slots.release()
                continue
            flight = _Flight(unsettled=len(items))
            request = pb.BatchRequest()
            now = asyncio.get_running_loop().time()
            for item in items:
                item.flight = flight
                self._in_flight[item.id] = item
                # Rounded to the microsecond first: 0.3 s left can read 300.00000000001 ms
                # in floats, which must not be sent as 301.
                left_ms = round((item.deadline - now) * 1000, 3)
                timeout_ms = min(TIMEOUT_MS_MAX, max(1, math.ceil(left_ms)))
                entry = request.items.add(id=item.id, timeout_ms=timeout_ms)
                entry.metadata.update(item.metadata)
                getattr(entry, item.field_name).CopyFrom(item.request)
            await self._call.write(request)
            self._stats.requests_sent += 1
            self._stats.items_sent += len(items)

    async def _take(self) -> list[_Item]:
        """Up to batch_items_max live items; those out of time are answered here, unsent."""
        while not self._queue:
            self._queued.clear()
            await self._queued.wait()
        now = asyncio.get_running_loop().time()
        items: list[_Item] = []
        while self._queue and len(items) < self._bounds.batch_items_max:
            item = self._queue.popleft()
            if item.future.done():
                continue  # its caller gave up
            if item.deadline <= now:
                message = "deadline passed before the item was sent; nothing applied"
                self._settle(item, _error_result(item.id, errors.deadline_not_applied(message)))
                self._stats.items_expired += 1
                continue
            items.append(item)
        if not items:
            # Only now: items taken are pending until answered, and a drain that saw the
            # stream idle while they were still being written would half-close the call
            # under that write (gRPC fails both with INTERNAL).
            self._note_idle()
        return items

    async def _read(self) -> str:
        while True:
            response = await self._call.read()
            if response is grpc.aio.EOF:
                return _SERVER_CLOSED
            for result in response.results:
                item = self._in_flight.pop(result.id, None)
                if item is None:
                    continue  # its caller gave up already
                self._release(item)
                self._settle(item, result)
                self._stats.items_answered += 1
            self._note_idle()

    def _release(self, item: _Item) -> None:
        flight = item.flight
        assert flight is not None and flight.unsettled > 0
        flight.unsettled -= 1
        if flight.unsettled == 0:
            self._slots.release()

    def _settle(self, item: _Item, result: pb.BatchItemResult) -> None:
        if not item.future.done():
            item.future.set_result(result)

    def _note_idle(self) -> None:
        if not self._queue and not self._in_flight:
            self._idle.set()

    def _fail_all(self, reason: str) -> None:
        sent = [item for item in self._in_flight.values() if not item.future.done()]
        unsent = [item for item in self._queue if not item.future.done()]
        self._in_flight.clear()
        self._queue.clear()
        self._idle.set()
        if not sent and not unsent and reason in _CLEAN_ENDS:
            return
        self._stats.streams_broken += 1
        self._stats.items_failed_unavailable += len(sent) + len(unsent)
        log.warning("batch_stream_broken", reason=reason, items_failed=len(sent) + len(unsent))
        for item in sent:
            mutating = rpcs.is_mutating(item.field_name)
            message = f"Batch stream broke ({reason}) with the item sent: " + (
                "outcome unknown, retry with the same idempotency key"
                if mutating
                else "retry the read"
            )
            status = errors.stream_broken(message, sent=True, mutating=mutating)
            self._settle(item, _error_result(item.id, status))
        for item in unsent:
            message = f"Batch stream broke ({reason}) before the item was sent; nothing applied"
            status = errors.stream_broken(message, sent=False, mutating=True)
            self._settle(item, _error_result(item.id, status))


def _reason(task: asyncio.Task[object]) -> str:
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    if error is None:
        return str(task.result())
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)


class StreamBatcher:
    """Multiplexes concurrent calls onto one ``Inventory.Batch`` stream over ``channel``.

    ``await call(field_name, request, timeout_s)`` returns the item's ``BatchItemResult``
    (its ``error`` or the response in the oneof field named ``field_name``); it raises only
    ``Overloaded`` (pending_items_max reached) and, after ``close()``, ``RuntimeError``.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        batch_items_max: int = BATCH_ITEMS_MAX_DEFAULT,
        requests_in_flight_max: int = REQUESTS_IN_FLIGHT_MAX_DEFAULT,
        pending_items_max: int = PENDING_ITEMS_MAX_DEFAULT,
        answer_grace_s: float = ANSWER_GRACE_S_DEFAULT,
        close_drain_s_max: float = CLOSE_DRAIN_S_MAX_DEFAULT,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        assert 1 <= batch_items_max <= batching.BATCH_ITEMS_MAX, batch_items_max
        assert requests_in_flight_max >= 1 and pending_items_max >= 1
        self._stub = pb_grpc.InventoryStub(channel)
        # What every stream is opened with (the caller's token).
        self._metadata = tuple(metadata)
        self._bounds = _Bounds(batch_items_max, requests_in_flight_max, pending_items_max)
        self._answer_grace_s = answer_grace_s
        self._close_drain_s_max = close_drain_s_max
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        self._streams: set[_Stream] = set()
        self._closed = False
        self.stats = BatcherStats()

    @property
    def pending_items(self) -> int:
        stream = self._stream
        return 0 if stream is None or stream.broken else stream.pending

    async def call(
        self,
        field_name: str,
        request: Message,
        timeout_s: float,
        metadata: Mapping[str, str] | None = None,
    ) -> pb.BatchItemResult:
        """``metadata``: carried with the item besides the call's own (``calls.request_metadata``),
        e.g. the client span's traceparent."""
        if self._closed:
            raise RuntimeError("StreamBatcher is closed")
        assert field_name in batching.CALL_FIELDS, field_name
        assert timeout_s > 0, timeout_s
        stream = self._open_stream()
        if stream.pending >= self._bounds.pending_items_max:
            raise Overloaded.pending_items_full(self._bounds.pending_items_max)
        loop = asyncio.get_running_loop()
        carried = calls.request_metadata.get()
        item = _Item(
            next(self._ids),
            field_name,
            request,
            loop.time() + timeout_s,
            loop.create_future(),
            {**carried, **metadata} if metadata else carried,
        )
        stream.enqueue(item)
        try:
            async with asyncio.timeout_at(item.deadline + self._answer_grace_s):
                return await item.future
        except TimeoutError:
            stream.forget(item)
            self.stats.items_expired += 1
            mutating = rpcs.is_mutating(field_name)
            fate = "outcome unknown" if mutating else "a read: nothing applied"
            message = f"no answer within {timeout_s} s (+{self._answer_grace_s} s); {fate}"
            status = errors.deadline_passed(message, mutating=mutating)
            return _error_result(item.id, status)
        except asyncio.CancelledError:
            stream.forget(item)
            raise

    async def close(self) -> None:
        """Refuse new calls, let pending ones finish (bounded), then end every stream."""
        self._closed = True
        if self._stream is not None and not self._stream.broken:
            await self._stream.drain(self._close_drain_s_max)
        streams = list(self._streams)
        for stream in streams:
            stream.task.cancel()
        await asyncio.gather(*(stream.task for stream in streams), return_exceptions=True)
        self._stream = None

    def _open_stream(self) -> _Stream:
        if self._stream is None or self._stream.broken:
            stream = _Stream(self._stub, self._bounds, self.stats, self._metadata)
            self._streams.add(stream)
            stream.task.add_done_callback(lambda _: self._streams.discard(stream))
            self._stream = stream
            self.stats.streams_opened += 1
        return self._stream
