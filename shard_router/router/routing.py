"""The router's view of the cluster: live members, the ring over them, a stream per shard.

``refresh`` reads membership (at most every ``refresh_interval_s_min`` unless forced by a
redirect) and keeps the ring: it is rebuilt only when the members change, and the shard
addresses are taken as read. Every shard address gets one channel (reconnecting quickly to a
shard restarted on the same address, ``SHARD_CHANNEL_OPTIONS``) and one ``ShardStream``: a
long-lived ``Inventory.Batch`` stream that carries the calls of all concurrent callers to that
shard. The router holds no stock state: a wrong view only costs a redirect and a retry.

How a ``ShardStream`` works, and its rules (those of the client's ``StreamBatcher``, for
items the router forwards rather than calls it makes):
  1. A ``Forwarded`` is a ``BatchItem`` as its caller sent it, its deadline and a callback.
     The stream sends the item message itself (one copy into the ``BatchRequest``, none of
     its call), with the stream's own id and the time it has left (``timeout_ms``), and
     calls ``answer`` exactly once with the result under the caller's id. No task and no
     future per item: ``forward`` takes a group of items (the Batch path's items of one
     request and one owner); ``call`` is the awaitable form, for unary calls and retries.
  2. Gathering: the writer sends what is queued as soon as one of the
     ``requests_in_flight_max`` slots is free; a ``BatchRequest`` holds its slot until every
     item of it is settled, so a busy stream carries few large requests, an idle one sends
     each item at once.
  3. Deadlines: an item whose deadline passed before it was sent is answered
     DEADLINE_NOT_APPLIED (retryable), unsent. One timer per request in flight gives up its
     items ``answer_grace_s`` after their deadline: DEADLINE_PASSED, outcome unknown for a
     mutation (the shard answers expired items itself; this happens only when it is stuck).
  4. A broken stream (an error, or the shard closing it with items pending) answers every
     item of it STREAM_BROKEN (UNAVAILABLE): outcome unknown for a mutation sent on it,
     retryable for one never sent and for a read. It is never reused: the next item opens
     a new one.
  5. Bounded: at most ``pending_items_max`` items queued or in flight; past it an item is
     answered OVERLOADED at once (back-pressure rather than a backlog).
  6. Policy-free: results are passed on as the shard (or rule 3, 4 or 5) gave them; the
     router's retries and honest answers are in shard_router.router.service.
  7. Structured: each stream's reader and writer are tasks owned by its run task, which the
     ``ShardStream`` owns; ``close()`` drains the pending items (bounded), half-closes the
     stream and cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import structlog
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from ..common import errors, tracing
from ..common.tls import ChannelFactory
from ..ring import Ring

log = structlog.get_logger(__name__)

# How fast a shard's channel reconnects. gRPC's defaults wait 1 s after a failed connection
# attempt, then 1.6 times longer each time (up to 120 s), so a shard restarted on the same
# address within a second was found again only ~2 s later, while the router's own retries
# (every 0.5 s at most, service.RETRY_BACKOFF_S_MAX) met a channel still failing fast. Here
# attempts start 100 ms apart (gRPC's floor for all three) and are never more than 500 ms
# apart, so the shard is found again within about half a second of listening.
SHARD_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    # gRPC's name for the least time one connection attempt is given (default 20 s). On
    # loopback or a LAN a refused connection fails at once anyway; 1 s lets an attempt to a
    # loaded host finish its handshake and abandons one to a host that vanished.
    ("grpc.min_reconnect_backoff_ms", 1000),
)
# timeout_ms is a uint32.
TIMEOUT_MS_MAX = 2**32 - 1

_CLOSED = "router closed the stream"
_SERVER_CLOSED = "the shard closed the stream"
# Ends of a stream that break nothing when no item is pending.
_CLEAN_ENDS = frozenset({_CLOSED, _SERVER_CLOSED})


class MemberLike(Protocol):
    @property
    def shard_id(self) -> str: ...
    @property
    def address(self) -> str: ...


MembershipReader = Callable[[], Awaitable[Sequence[MemberLike]]]
# Metadata a call is sent with, and what gives the metadata of a new stream (the router's
# token to the shards: shard_router.common.auth.TokenSource.metadata).
Metadata = Sequence[tuple[str, str]]
Credentials = Callable[[], Metadata]


@dataclass(frozen=True, slots=True)
class RoutingLimits:
    # A redirect forces a refresh, but not more often than this: a burst of redirects after a
    # membership change costs one read, not thousands.
    refresh_interval_s_min: float = 0.1
    # Background refresh period, so new members are seen without a redirect.
    refresh_interval_s: float = 1.0


@dataclass(frozen=True, slots=True)
class StreamLimits:
    # Items per BatchRequest to a shard: a busy stream costs one message per several hundred
    # items; half the shard's BATCH_ITEMS_MAX (1000), so a request is never refused whole.
    batch_items_max: int = 500
    # BatchRequests outstanding per stream (pipelining): enough to keep the owner's pump busy
    # while the previous flush commits; more only makes each request smaller.
    requests_in_flight_max: int = 4
    # Items queued or in flight per shard: a few seconds of the fastest shard's throughput.
    # Only batch_items_max * requests_in_flight_max (2,000) are on the wire at once, within
    # the shard's STREAM_ITEMS_HELD_MAX (4,000); the rest wait here.
    pending_items_max: int = 50_000
    # How long after an item's deadline the router still waits for the shard's own answer
    # (DEADLINE_NOT_APPLIED, a definite outcome): a round trip plus one flush.
    answer_grace_s: float = 0.5
    # How long close() waits for pending items before cancelling them.
    close_drain_s_max: float = 10.0


Answer = Callable[[pb.BatchItemResult], None]


@dataclass(eq=False, slots=True)
class Forwarded:
    """One item on its way to a shard, and whom to tell its result (exactly once)."""

    # The BatchItem to send, as its caller built it; the stream sets its id and timeout_ms.
    item: pb.BatchItem
    deadline: float  # time.monotonic()
    mutating: bool
    answer: Answer
    # The id the result goes back under (the item's id when it was handed over).
    caller_id: int = 0
    sent_id: int = 0
    flight: _Flight | None = None
    settled: bool = False

    @staticmethod
    def of(item: pb.BatchItem, deadline: float, mutating: bool, answer: Answer) -> Forwarded:
        return Forwarded(item, deadline, mutating, answer, caller_id=item.id)


@dataclass(eq=False, slots=True)
class _Flight:
    """One BatchRequest on the wire: it holds a slot until all its items are settled."""

    items: Sequence[Forwarded]
    unsettled: int
    give_up: asyncio.TimerHandle | None = field(default=None)


def _settle(forwarded: Forwarded, result: pb.BatchItemResult) -> None:
    if forwarded.settled:
        return
    forwarded.settled = True
    forwarded.flight = None
    result.id = forwarded.caller_id
    try:
        forwarded.answer(result)
    except Exception:  # a bug in one caller must not break the stream of all the others
        log.exception("forwarded_answer_failed")


def _settle_error(forwarded: Forwarded, status: status_pb2.Status) -> None:
    _settle(forwarded, pb.BatchItemResult(error=status))


def _timeout_ms(left_s: float) -> int:
    # Rounded to the microsecond first: 0.3 s left can read 300.00000000001 ms in floats,
    # which must not become 301.
    return min(TIMEOUT_MS_MAX, max(1, math.ceil(round(left_s * 1000, 3))))


class _Stream:
    """One Batch call to a shard and the items sent or to be sent on it. Broken once."""

    def __init__(
        self, stub: pb_grpc.InventoryStub, limits: StreamLimits, metadata: Metadata = ()
    ) -> None:
        self._limits = limits
        self._call = stub.Batch(metadata=metadata or None)
        self._queue: deque[Forwarded] = deque()
        self._in_flight: dict[int, Forwarded] = {}
        self._ids = itertools.count(1)
        self._queued = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(limits.requests_in_flight_max)
        self.broken = False
        # Shared by many calls: none of the opening call's metadata, log fields or span.
        self.task = asyncio.create_task(self._run(), context=tracing.detached())

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def send(self, forwarded: Iterable[Forwarded]) -> None:
        assert not self.broken
        self._queue.extend(forwarded)
        self._idle.clear()
        self._queued.set()

    def forget(self, forwarded: Forwarded) -> None:
        """Its caller stopped waiting: a late answer is dropped, an unsent item not sent."""
        forwarded.settled = True
        if self._in_flight.pop(forwarded.sent_id, None) is not None:
            self._release(forwarded)
        self._note_idle()

    async def drain(self, timeout_s: float) -> None:
        """Wait until nothing is pending, then half-close; the shard ends the stream."""
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
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            batch = await self._take()
            if not batch:
                self._slots.release()
                continue
            flight = _Flight(batch, unsettled=len(batch))
            now = time.monotonic()
            for forwarded in batch:
                forwarded.sent_id = next(self._ids)
                forwarded.flight = flight
                self._in_flight[forwarded.sent_id] = forwarded
                forwarded.item.id = forwarded.sent_id
                forwarded.item.timeout_ms = _timeout_ms(forwarded.deadline - now)
            earliest = min(forwarded.deadline for forwarded in batch)
            wait_s = earliest + self._limits.answer_grace_s - now
            flight.give_up = loop.call_later(wait_s, self._give_up, flight)
            await self._call.write(pb.BatchRequest(items=[f.item for f in batch]))

    async def _take(self) -> list[Forwarded]:
        """Up to batch_items_max live items; those out of time are answered here, unsent."""
        while not self._queue:
            self._queued.clear()
            await self._queued.wait()
        now = time.monotonic()
        batch: list[Forwarded] = []
        while self._queue and len(batch) < self._limits.batch_items_max:
            forwarded = self._queue.popleft()
            if forwarded.settled:
                continue  # its caller gave up
            if forwarded.deadline <= now:
                message = "deadline passed before the item was sent; nothing applied"
                _settle_error(forwarded, errors.deadline_not_applied(message))
                continue
            batch.append(forwarded)
        if not batch:
            # Only now: what was taken is pending until answered; a drain that saw the stream
            # idle meanwhile would half-close the call under its write (client/_batcher.py).
            self._note_idle()
        return batch

    async def _read(self) -> str:
        while True:
            response = await self._call.read()
            if response is grpc.aio.EOF:
                return _SERVER_CLOSED
            for result in response.results:
                forwarded = self._in_flight.pop(result.id, None)
                if forwarded is None:
                    continue  # its caller gave up already
                self._release(forwarded)
                _settle(forwarded, result)
            self._note_idle()

    def _give_up(self, flight: _Flight) -> None:
        """The request's earliest deadline plus the grace has passed: give those items up,
        and look again at the next earliest of the rest."""
        grace_s = self._limits.answer_grace_s
        now = time.monotonic()
        earliest = math.inf
        for forwarded in flight.items:
            if forwarded.settled or forwarded.flight is not flight:
                continue
            if forwarded.deadline + grace_s > now:
                earliest = min(earliest, forwarded.deadline)
                continue
            del self._in_flight[forwarded.sent_id]
            self._release(forwarded)
            fate = "outcome unknown" if forwarded.mutating else "a read: nothing applied"
            message = f"no answer from the shard within {grace_s} s after the deadline; {fate}"
            _settle_error(forwarded, errors.deadline_passed(message, mutating=forwarded.mutating))
        if flight.unsettled:
            wait_s = earliest + grace_s - now
            flight.give_up = asyncio.get_running_loop().call_later(wait_s, self._give_up, flight)
        self._note_idle()

    def _release(self, forwarded: Forwarded) -> None:
        flight = forwarded.flight
        assert flight is not None and flight.unsettled > 0
        flight.unsettled -= 1
        if flight.unsettled == 0:
            if flight.give_up is not None:
                flight.give_up.cancel()
            flight.items = ()
            self._slots.release()

    def _note_idle(self) -> None:
        if not self._queue and not self._in_flight:
            self._idle.set()

    def _fail_all(self, reason: str) -> None:
        sent = [f for f in self._in_flight.values() if not f.settled]
        unsent = [f for f in self._queue if not f.settled]
        for forwarded in sent:
            if forwarded.flight is not None and forwarded.flight.give_up is not None:
                forwarded.flight.give_up.cancel()
        self._in_flight.clear()
        self._queue.clear()
        self._idle.set()
        if not sent and not unsent and reason in _CLEAN_ENDS:
            return
        log.warning("shard_stream_broken", reason=reason, items_failed=len(sent) + len(unsent))
        for forwarded in sent:
            fate = (
                "outcome unknown, retry with the same idempotency key"
                if forwarded.mutating
                else "retry the read"
            )
            message = f"Batch stream to the shard broke ({reason}) with the item sent: {fate}"
            status = errors.stream_broken(message, sent=True, mutating=forwarded.mutating)
            _settle_error(forwarded, status)
        for forwarded in unsent:
            message = f"Batch stream to the shard broke ({reason}) before the item was sent"
            status = errors.stream_broken(f"{message}; nothing applied", sent=False, mutating=True)
            _settle_error(forwarded, status)


def _reason(task: asyncio.Task[object]) -> str:
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    if error is None:
        return str(task.result())
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)


class ShardStream:
    """The router's items to one shard, on one long-lived ``Inventory.Batch`` stream at a
    time (module docstring). ``forward`` never raises and never waits; ``call`` awaits."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        limits: StreamLimits | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self._stub = pb_grpc.InventoryStub(channel)
        # The metadata each new stream is opened with (the router's token), asked anew for
        # each stream so that a rotated token is used from the next one on.
        self._credentials = credentials
        self.limits = limits or StreamLimits()
        assert self.limits.batch_items_max >= 1, self.limits
        assert self.limits.requests_in_flight_max >= 1, self.limits
        self._stream: _Stream | None = None
        self._streams: set[_Stream] = set()
        self._closed = False

    @property
    def pending_items(self) -> int:
        stream = self._stream
        return 0 if stream is None or stream.broken else stream.pending

    def forward(self, forwarded: Sequence[Forwarded]) -> None:
        """Send these items; each is answered exactly once, through its ``answer``."""
        self._send(forwarded)

    async def call(
        self, item: pb.BatchItem, deadline: float, *, mutating: bool
    ) -> pb.BatchItemResult:
        """Send one item and wait for its result (under ``item.id``)."""
        future: asyncio.Future[pb.BatchItemResult] = asyncio.get_running_loop().create_future()

        def answer(result: pb.BatchItemResult) -> None:
            if not future.done():
                future.set_result(result)

        forwarded = Forwarded.of(item, deadline, mutating, answer)
        stream = self._send([forwarded])
        try:
            return await future
        except asyncio.CancelledError:
            if stream is not None:
                stream.forget(forwarded)
            raise

    async def close(self) -> None:
        """Refuse new items, let pending ones finish (bounded), then end every stream."""
        self._closed = True
        if self._stream is not None and not self._stream.broken:
            await self._stream.drain(self.limits.close_drain_s_max)
        streams = list(self._streams)
        for stream in streams:
            stream.task.cancel()
        await asyncio.gather(*(stream.task for stream in streams), return_exceptions=True)
        self._stream = None

    def _send(self, forwarded: Sequence[Forwarded]) -> _Stream | None:
        if self._closed:
            for each in forwarded:
                message = "the router is closing its stream to the shard; nothing applied"
                _settle_error(each, errors.stream_broken(message, sent=False, mutating=True))
            return None
        stream = self._open()
        room = max(0, self.limits.pending_items_max - stream.pending)
        stream.send(forwarded[:room])
        if len(forwarded) > room:
            message = f"router: pending_items_max ({self.limits.pending_items_max}) items already"
            status = errors.overloaded(f"{message} wait on the stream to this shard")
            for shed in forwarded[room:]:
                _settle_error(shed, status)
        return stream

    def _open(self) -> _Stream:
        if self._stream is None or self._stream.broken:
            metadata = self._credentials() if self._credentials is not None else ()
            stream = _Stream(self._stub, self.limits, metadata)
            self._streams.add(stream)
            stream.task.add_done_callback(lambda _: self._streams.discard(stream))
            self._stream = stream
        return self._stream


class Routes:
    def __init__(
        self,
        read_members: MembershipReader,
        partition_count: int,
        limits: RoutingLimits | None = None,
        stream_limits: StreamLimits | None = None,
        credentials: Credentials | None = None,
        *,
        channels: ChannelFactory | None = None,
    ) -> None:
        self._read_members = read_members
        self._credentials = credentials
        # Plaintext or TLS to the shards (shard_router.common.tls).
        self._channel_factory = channels or ChannelFactory()
        self._partition_count = partition_count
        self.limits = limits or RoutingLimits()
        self._stream_limits = stream_limits or StreamLimits()
        self._ring: Ring | None = None
        self._addresses: dict[str, str] = {}
        self._streams: dict[str, ShardStream] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Lock = asyncio.Lock()

    @property
    def ring_version(self) -> str:
        return self._ring.version if self._ring else ""

    @property
    def addresses(self) -> list[str]:
        """The live shards' addresses, in order."""
        return sorted(set(self._addresses.values()))

    @property
    def pending_items(self) -> int:
        """Items forwarded to the shards and not yet answered, over every stream."""
        return sum(stream.pending_items for stream in self._streams.values())

    def address_of(self, partition: int) -> str | None:
        if self._ring is None:
            return None
        return self._addresses.get(self._ring.owner_of(partition))

    def stream(self, address: str) -> ShardStream:
        stream = self._streams.get(address)
        if stream is None:
            channel = self._channel_factory.open(address, SHARD_CHANNEL_OPTIONS)
            self._channels[address] = channel
            stream = ShardStream(channel, self._stream_limits, self._credentials)
            self._streams[address] = stream
        return stream

    async def refresh(self, force: bool = False) -> None:
        async with self._refreshing:
            since = time.monotonic() - self._refreshed_at
            if since < (
                self.limits.refresh_interval_s_min if force else self.limits.refresh_interval_s
            ):
                return
            members = await self._read_members()
            self._refreshed_at = time.monotonic()
            self._addresses = {m.shard_id: m.address for m in members}
            self._keep_ring(tuple(sorted(self._addresses)))
            for gone in set(self._streams) - set(self._addresses.values()):
                await self._close(gone)

    def _keep_ring(self, members: tuple[str, ...]) -> None:
        """Rebuild the ring only when the members changed (the addresses are read anew)."""
        if members == (self._ring.members if self._ring else ()):
            return
        ring = Ring(members, partition_count=self._partition_count) if members else None
        log.info("ring_changed", version=ring.version if ring else "", members=list(members))
        self._ring = ring

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:
                log.warning("membership_read_failed", error=repr(error))
            await asyncio.sleep(self.limits.refresh_interval_s)

    async def close(self) -> None:
        for address in list(self._streams):
            await self._close(address)

    async def _close(self, address: str) -> None:
        stream = self._streams.pop(address)
        await stream.close()
        await self._channels.pop(address).close()
