"""AvailabilityStream.Watch on the router: one reader of the change streams, many subscribers.

How it works. A ``WatchHub`` owns one task that reads the streams of the partitions its
subscribers watch, after the hub's positions (``EventSource.read``), and offers each entry to
the subscribers of its merchant; with no subscriber it reads nothing. A subscriber first has
its partitions watched (``WatchHub.watch``): one that nobody watched starts at its stream's
last id, read then, and a read under way is cancelled so that the next one includes it; when
its last subscriber leaves, a partition is read no more. Offering never awaits: a
``Subscriber`` keeps the matching changes pending in an ``OrderedDict`` keyed by key (latest
version wins and moves to the end, so pending stays in read order); past
``subscriber_pending_keys_max`` keys the pending changes are dropped and the subscriber is
marked for resync. Each Watch RPC drains its own subscriber, so a slow client only slows
itself.

List-then-watch. Once its partitions are watched, a subscriber registers (live entries start
buffering), then either reads a snapshot from the read view, or, given a resume token whose
positions are all still retained (not older than ``first_ids()``), replays its partitions
with ``range()`` from the token up to the hub's positions at registration, then goes live.

Rules.
- Per key the versions sent only go up: a change is sent only above the last version sent,
  a snapshot level only at or above it (a snapshot repeats unchanged keys, it is complete).
- A resume token names, per partition, a position the subscriber has passed: every matching
  entry at or before it was sent or superseded by a later entry of the same key. It reads
  "snapshot needed" while a snapshot is sent and until the stream has passed the source's
  last ids read right after the snapshot (``barrier``): replaying from before that point
  could repeat versions older than the snapshot showed. The read view must therefore be at
  least as new as the stream entries (the publisher writes both in one step).
- Source errors are retried with backoff by whoever called; streams keep their heartbeats.
  When the hub cannot prove it missed nothing on a partition (its position trimmed or gone
  after an outage), every subscriber of that partition gets a ``Resync`` and a fresh
  snapshot.
- A read that started before the watched set widened is void (its positions are not the
  hub's any more): its entries are dropped unread and read again by the next read.

Hot keys. A key split over buckets streams as one key, its parts added up
(``watch_totals.SplitTotals``): while anyone watches, the hub also reads the partitions of
the buckets of every split key the router knows (``follow_splits``, after each refresh of
the map), and after each read offers the totals its parts' changes moved, under the home's
partition at the hub's position there (a total is no stream entry of its own: the entries
it follows were offered already). Buckets never show as keys of their own. Totals
are not replayed: a resumed stream gets every matching split key's total afresh after its
catch-up, and a snapshot shows the totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar

import grpc
import structlog
from inventory.v1 import events_pb2, events_pb2_grpc
from inventory.v1 import inventory_pb2 as pb

from inventory_core import (
    PARTITION_COUNT,
    CapacityExhausted,
    Invalid,
    partition_of,
    validate_watch_filter,
)

from ..common import errors
from ..common.calls import abort
from ._watch_token import (
    ZERO,
    EntryId,
    PositionsEncoder,
    ResumeToken,
    decode,
    encode_positions,
    fingerprint_of,
    format_entry_id,
    parse_entry_id,
    positions_token,
    snapshot_token,
)
from .hot_keys import SplitView
from .watch_totals import SplitTotals

log = structlog.get_logger(__name__)

T = TypeVar("T")
KeyId = tuple[str, str]  # (sku_id, location_id): a subscriber's merchant is fixed
StreamEntry = tuple[int, str, events_pb2.AvailabilityChanged]  # (partition, entry id, change)

SNAPSHOT_INITIAL = "initial"
SNAPSHOT_RESUME_TOKEN_TOO_OLD = "resume_token_too_old"
SNAPSHOT_RESYNC = "resync"
RESYNC_SUBSCRIBER_TOO_SLOW = "subscriber_too_slow"
RESYNC_EVENTS_UNAVAILABLE = "events_unavailable"


class EventSource(Protocol):
    """The change streams and the read view (persistence.events.EventReader in production)."""

    async def snapshot(
        self, merchant_id: str, location_ids: Sequence[str], sku_ids: Sequence[str]
    ) -> list[tuple[pb.StockLevel, int, int]]: ...

    async def last_ids(self, partitions: Sequence[int] | None = None) -> dict[int, str]: ...

    async def first_ids(self, partitions: Sequence[int] | None = None) -> dict[int, str]: ...

    async def read(
        self, positions: dict[int, str], block_ms: int, count: int
    ) -> list[StreamEntry]: ...

    async def range(
        self, partition: int, after_id: str, up_to_id: str, count: int
    ) -> list[StreamEntry]: ...


@dataclass(frozen=True, slots=True)
class WatchLimits:
    # Issue 5 asks one router to sustain at least 1,000 subscribers; twice that leaves room
    # for reconnect storms. Beyond it Watch answers RESOURCE_EXHAUSTED.
    subscribers_max: int = 2000
    # Distinct keys pending per subscriber (coalesced, latest wins). A subscriber this far
    # behind is cheaper to serve with a snapshot; ~300 bytes each bounds a subscriber at
    # ~300 KiB and all of them at ~600 MiB in the worst case.
    subscriber_pending_keys_max: int = 1000
    # Last version sent per key, remembered beyond a snapshot's keys: past this the oldest
    # are forgotten (order per partition still keeps versions going up).
    subscriber_versions_keys_max: int = 10_000
    # ~100 bytes per StockLevel: ~100 KiB messages, far under the 4 MiB message bound.
    snapshot_levels_per_message_max: int = 1000
    # Idle streams get a heartbeat this often: proxies keep them open, clients notice death.
    heartbeat_interval_s: float = 5.0
    # The hub's blocking read returns at once when entries arrive; the bound only sets how
    # long a read may sit idle.
    read_block_ms: int = 1000
    # Entries per partition per hub read (XREAD COUNT is per stream): a full read of all
    # 1024 partitions is at most ~100k entries (~30 MiB), usually a few hundred.
    read_entries_per_partition_max: int = 100
    # At least this long between two hub reads. A read of all 1024 streams costs the router
    # ~0.2 ms of CPU whatever it returns (its command is pre-built, persistence.readview);
    # under a steady write load a read returning at once with a handful of entries would
    # still spend the router on reading. Waiting this long first gathers ~every change of the
    # interval into one read, for at most this much added lag. Not after a read that filled
    # a partition's page (read_entries_per_partition_max): that partition is behind, and the
    # next read starts at once. (With the wait, one partition was read at 100 entries per
    # 20 ms at most, 5,000 changes a second: one owner's hot key, at ~5,500, fell seconds
    # behind in bench-hot.)
    read_interval_ms_min: int = 20
    # Entries per catch-up range call: bounds the memory of one catch-up step.
    range_entries_max: int = 1000
    # Backoff between attempts when the source (Redis) fails.
    source_retry_backoff_s_initial: float = 0.05
    source_retry_backoff_s_max: float = 2.0
    # A filter is a catalogue page or a store list, not a catalogue.
    filter_location_ids_max: int = 100
    filter_sku_ids_max: int = 1000


@dataclass(slots=True)
class WatchMetrics:
    subscribers: int = 0
    subscribers_peak: int = 0
    subscribes_total: int = 0
    subscribers_refused: int = 0
    resyncs: int = 0
    snapshots: int = 0
    events_read: int = 0
    events_delivered: int = 0
    events_coalesced: int = 0
    heartbeats: int = 0
    source_errors: int = 0
    reads: int = 0  # hub reads of the streams issued
    watch_reads: int = 0  # last-id reads that started partitions nobody watched
    partitions_watched: int = 0  # gauge: partitions whose streams the hub reads
    # Commit to hub read, from the entries' committed_at_ms.
    lag_ms_last: int = 0
    lag_ms_max: int = 0


@dataclass(frozen=True, slots=True)
class WatchFilter:
    merchant_id: str
    location_ids: frozenset[str] = frozenset()
    sku_ids: frozenset[str] = frozenset()

    def matches(self, key: pb.InventoryKey) -> bool:
        return (
            key.merchant_id == self.merchant_id
            and (not self.location_ids or key.location_id in self.location_ids)
            and (not self.sku_ids or key.sku_id in self.sku_ids)
        )

    def partitions(self, partition_count: int) -> tuple[int, ...]:
        """The partitions this filter's keys can live on (all of them without locations)."""
        if not self.location_ids:
            return tuple(range(partition_count))
        return tuple(
            sorted({partition_of(self.merchant_id, x, partition_count) for x in self.location_ids})
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.merchant_id, self.location_ids, self.sku_ids)


class SnapshotRefused(Exception):
    """Raised by ``EventSource.snapshot`` when the filter matches more keys than it serves.

    Not retried: Watch answers RESOURCE_EXHAUSTED (narrow the filter). The composition root
    converts ``persistence.readview.SnapshotTooLarge`` into this.
    """

    def __init__(self, matching: int, limit: int) -> None:
        super().__init__(f"{matching} keys match, at most {limit} per snapshot")
        self.matching = matching
        self.limit = limit


class HubClosed(Exception):
    """The hub stopped (router shutdown): streams end with UNAVAILABLE and clients resume."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class WatchHub:
    """Owns the reader task and the subscriber registry. ``async with hub:`` or start/close."""

    def __init__(
        self,
        source: EventSource,
        limits: WatchLimits | None = None,
        *,
        partition_count: int = PARTITION_COUNT,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.source = source
        self.limits = limits or WatchLimits()
        self.partition_count = partition_count
        self.clock_ms = clock_ms
        self.metrics = WatchMetrics()
        self.totals = SplitTotals(partition_count)
        # On a watched partition, every entry at or before its position was offered to every
        # subscriber registered then (elsewhere a position is left from an earlier watch).
        self.positions: dict[int, EntryId] = {}
        # The watched partitions' positions as the reader sends them, in partition order.
        # Replaced, not changed, when the set changes: a read under way keeps its own.
        self._read_positions: dict[int, str] = {}
        # Watching subscribers per partition; those of all partitions are only counted (a
        # thousand merchant-wide subscribers need not touch a thousand counts each).
        self._watchers_all = 0
        self._watchers: dict[int, int] = {}
        self._watching = asyncio.Event()  # set while some partition is watched
        self._watch_lock = asyncio.Lock()  # one widening (or outage check) at a time
        self._watch_waiting: dict[Subscriber, None] = {}  # waiting for it, in arrival order
        self._widenings = 0  # +1 whenever the watched set widens: voids a read under way
        self._read: asyncio.Future[list[StreamEntry]] | None = None
        self.generation = 0  # +1 whenever positions move: tokens are cached against it
        self._positions_blob: tuple[int, str] = (-1, "")
        self._positions_encoder = PositionsEncoder()
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._reader: asyncio.Task[None] | None = None
        # The newest last_ids() read in flight or done, with when it started (monotonic s):
        # concurrent snapshots share one read of all partitions instead of one each.
        self._last_ids_read: tuple[float, asyncio.Future[dict[int, str]]] | None = None
        self.closed = False

    async def __aenter__(self) -> WatchHub:
        self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def last_ids_after(
        self, not_before: float, partitions: Sequence[int] | None = None
    ) -> dict[int, str]:
        """``source.last_ids(partitions)`` as read by a call that started at or after
        ``not_before``.

        A snapshot's barrier must be read after the snapshot itself. For all partitions, any
        read that started later serves every snapshot finished before it (singleflight), so
        a thousand subscribers arriving together cost a handful of reads, not a thousand; a
        few partitions are read on their own.
        """
        if partitions is not None:
            return await self.source.last_ids(partitions)
        shared = self._last_ids_read
        reusable = (
            shared is not None
            and shared[0] >= not_before
            and not (shared[1].done() and (shared[1].cancelled() or shared[1].exception()))
        )
        if not reusable:
            shared = (time.monotonic(), asyncio.ensure_future(self.source.last_ids()))
            self._last_ids_read = shared
        assert shared is not None
        return await asyncio.shield(shared[1])

    def start(self) -> None:
        assert self._reader is None, "started twice"
        self._reader = asyncio.create_task(self._run(), name="watch-hub-reader")

    async def close(self) -> None:
        """Stop reading, then end every subscriber's stream (each RPC unregisters itself)."""
        self.closed = True
        for task in (self._reader, self._read):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for subscriber in self._all_subscribers():
            subscriber.close()

    # ----------------------------------------------------------------- subscribers

    def subscribe(self, watch_filter: WatchFilter) -> Subscriber | CapacityExhausted:
        if self.closed or self.metrics.subscribers >= self.limits.subscribers_max:
            self.metrics.subscribers_refused += 1
            return CapacityExhausted("subscribers_max", self.limits.subscribers_max)
        subscriber = Subscriber(self, watch_filter)
        self._subscribers.setdefault(watch_filter.merchant_id, set()).add(subscriber)
        self.metrics.subscribers += 1
        self.metrics.subscribes_total += 1
        self.metrics.subscribers_peak = max(self.metrics.subscribers_peak, self.metrics.subscribers)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        group = self._subscribers.get(subscriber.filter.merchant_id)
        if group is None or subscriber not in group:
            return
        group.discard(subscriber)
        if not group:
            del self._subscribers[subscriber.filter.merchant_id]
        self.metrics.subscribers -= 1
        if subscriber.watching:
            subscriber.watching = False
            if self._count(subscriber, -1):
                self._set_read_positions()
        subscriber.close()

    async def watch(self, subscriber: Subscriber) -> None:
        """Have the reader read ``subscriber``'s partitions; the subscriber registers after.

        A partition nobody watched starts at its stream's last id as read now: the hub has
        not followed it, and a subscriber registering after this needs nothing older. A
        read under way is cancelled, so that the next one includes the new partitions.
        Subscribers arriving together share one read of the last ids (whoever holds the
        lock serves everyone waiting), so a reconnect storm costs a handful of reads.
        """
        if subscriber.watching:
            return
        self._watch_waiting[subscriber] = None
        try:
            async with self._watch_lock:
                if not subscriber.watching:
                    await self._watch_waiting_subscribers()
        finally:
            self._watch_waiting.pop(subscriber, None)

    async def _watch_waiting_subscribers(self) -> None:
        arrivals = list(self._watch_waiting)
        if any(s.all_partitions for s in arrivals):
            wanted: set[int] = set(range(self.partition_count))
        else:
            wanted = {p for s in arrivals for p in s.partitions} | self.totals.partitions()
        new = await self._start_watching(wanted)
        # No await from here on: the set, the positions and the counts change together.
        for arrival in arrivals:
            if not arrival.closed:  # else it left (unsubscribed) while we read
                arrival.watching = True
                self._count(arrival, +1)
            self._watch_waiting.pop(arrival, None)
        self._widened(new)

    async def _start_watching(self, wanted: set[int]) -> list[int]:
        """Of ``wanted``, the partitions not watched yet, each positioned at its stream's
        last id as read now (the caller widens the set with them, without an await)."""
        new = sorted(wanted - self._read_positions.keys())
        if new:
            self.metrics.watch_reads += 1
            lasts = await self.source.last_ids(new)
            for partition in new:
                self.positions[partition] = parse_entry_id(lasts.get(partition, "0-0"))
        return new

    def _widened(self, new: list[int]) -> None:
        if new:
            self.generation += 1
            self._widenings += 1
            self._set_read_positions()
            if self._read is not None:
                self._read.cancel()

    async def follow_splits(self, views: Sequence[SplitView]) -> None:
        """The split keys are now these (``HotKeyMap`` after a refresh): read their buckets'
        partitions while anyone watches, and offer the totals their levels moved."""
        async with self._watch_lock:
            followed = self.totals.partitions()
            totals = self.totals.follow(views)
            new: list[int] = []
            if self._watchers and not self._watchers_all:
                new = await self._start_watching(set(self.totals.partitions()))
            # No await from here on.
            self._widened(new)
            if not new and followed != self.totals.partitions():
                self._set_read_positions()  # buckets of merged keys are read no more
        for partition, total in totals:
            self._offer(partition, self.positions.get(partition, ZERO), total)

    def _count(self, subscriber: Subscriber, delta: int) -> bool:
        """Count a subscriber in (+1) or out (-1); whether the watched set changed."""
        edge = 1 if delta > 0 else 0  # the first watcher came, or the last left
        if subscriber.all_partitions:
            self._watchers_all += delta
            return self._watchers_all == edge
        changed = False
        for partition in subscriber.partitions:
            count = self._watchers.get(partition, 0) + delta
            changed = changed or count == edge
            if count:
                self._watchers[partition] = count
            else:
                del self._watchers[partition]
        return changed

    def _set_read_positions(self) -> None:
        watched: Sequence[int]
        if self._watchers_all:
            watched = range(self.partition_count)
        elif self._watchers:
            watched = sorted(self._watchers.keys() | self.totals.partitions())
        else:
            watched = ()
        self._read_positions = {p: format_entry_id(self.positions.get(p, ZERO)) for p in watched}
        self.metrics.partitions_watched = len(self._read_positions)
        if self._read_positions:
            self._watching.set()
        else:
            self._watching.clear()

    def positions_blob(self) -> str:
        """The hub's positions, encoded once per read batch and shared by all tokens."""
        if self._positions_blob[0] != self.generation:
            self._positions_blob = (self.generation, self._positions_encoder.encode(self.positions))
        return self._positions_blob[1]

    def _all_subscribers(self) -> list[Subscriber]:
        return [s for group in self._subscribers.values() for s in group]

    def pending_keys_max(self) -> int:
        """The most keys one subscriber has pending (for the metrics: a walk of them all)."""
        return max((len(s.pending) for s in self._all_subscribers()), default=0)

    # ---------------------------------------------------------------------- reader

    async def _run(self) -> None:
        backoff_s = self.limits.source_retry_backoff_s_initial
        continuous = True
        next_read_s = 0.0
        while True:
            await self._watching.wait()
            try:
                if not continuous:
                    await self._verify()
                    continuous = True
                pause_s = next_read_s - time.monotonic()
                if pause_s > 0:
                    await asyncio.sleep(pause_s)
                next_read_s = time.monotonic() + self.limits.read_interval_ms_min / 1000
                batch = await self._read_once()
            except Exception as error:
                self.metrics.source_errors += 1
                log.warning("watch_source_failed", error=repr(error), backoff_s=backoff_s)
                continuous = False
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.limits.source_retry_backoff_s_max)
                continue
            backoff_s = self.limits.source_retry_backoff_s_initial
            if batch is not None:
                self._fan_out(batch)
                if _filled_a_page(batch, self.limits.read_entries_per_partition_max):
                    next_read_s = 0.0  # a partition is behind: read on at once

    async def _read_once(self) -> list[StreamEntry] | None:
        """One read of the watched streams; None when the watched set widened meanwhile."""
        if not self._read_positions:
            return None
        widenings = self._widenings
        self.metrics.reads += 1
        read = asyncio.ensure_future(
            self.source.read(
                self._read_positions,
                self.limits.read_block_ms,
                self.limits.read_entries_per_partition_max,
            )
        )
        self._read = read
        try:
            await asyncio.wait({read})
        finally:
            self._read = None
            if not read.done():  # the reader itself is cancelled (close)
                read.cancel()
                await asyncio.wait({read})
        if read.cancelled() or widenings != self._widenings:
            return None  # void: the next read starts from the hub's positions as they are
        return read.result()

    async def _verify(self) -> None:
        """After a failed read: keep each watched position if nothing can have been missed.

        A position older than its stream's first id (trimmed during the outage) or newer
        than its last (the stream was lost) moves to the last id, and every subscriber of
        that partition gets a ``Resync`` and a fresh snapshot.
        """
        async with self._watch_lock:
            watched = list(self._read_positions)
            if not watched:
                return
            firsts = await self.source.first_ids(watched)
            lasts = await self.source.last_ids(watched)
            last = {p: parse_entry_id(lasts.get(p, "0-0")) for p in watched}
            lost = {
                p
                for p in watched
                if self.positions.get(p, ZERO) < parse_entry_id(firsts.get(p, "0-0"))
                or last[p] < self.positions.get(p, ZERO)
            }
            if not lost:
                return
            log.warning("watch_positions_lost", partitions=len(lost), first=min(lost))
            for partition in lost:
                self.positions[partition] = last[partition]
            self.generation += 1
            self._set_read_positions()
            for subscriber in self._all_subscribers():
                if subscriber.watching and not lost.isdisjoint(subscriber.partitions):
                    subscriber.mark_resync(RESYNC_EVENTS_UNAVAILABLE)

    def _fan_out(self, batch: list[StreamEntry]) -> None:
        """Offer each new entry to its merchant's subscribers; never awaits."""
        now_ms = self.clock_ms()
        read_positions = self._read_positions
        totals = self.totals
        for partition, entry_text, event in batch:
            assert 0 <= partition < self.partition_count, f"partition {partition} out of range"
            entry = parse_entry_id(entry_text)
            if entry <= self.positions.get(partition, ZERO):
                continue  # read twice (a retried read): offered already
            self.positions[partition] = entry
            if partition in read_positions:  # else nobody watches it any more
                read_positions[partition] = entry_text
            self.metrics.events_read += 1
            if event.committed_at_ms:
                lag_ms = max(now_ms - event.committed_at_ms, 0)
                self.metrics.lag_ms_last = lag_ms
                self.metrics.lag_ms_max = max(self.metrics.lag_ms_max, lag_ms)
            if totals.take(event) is not None:
                self._offer(partition, entry, event)
        for home, total in totals.flush():  # split keys' totals: at their homes' positions
            self._offer(home, self.positions.get(home, ZERO), total)
        self.generation += 1

    def _offer(self, partition: int, entry: EntryId, event: events_pb2.AvailabilityChanged) -> None:
        for subscriber in self._subscribers.get(event.key.merchant_id, ()):
            subscriber.offer(partition, entry, event)


def _filled_a_page(batch: Sequence[StreamEntry], page: int) -> bool:
    """Whether some partition gave a full page (``page`` entries) in this read: it may have
    more waiting."""
    if len(batch) < page:
        return False
    return max(Counter(partition for partition, _, _ in batch).values()) >= page


Pending = tuple[int, EntryId, events_pb2.AvailabilityChanged]


class Subscriber:
    """One Watch stream's state: its pending changes, positions and the versions it sent."""

    def __init__(self, hub: WatchHub, watch_filter: WatchFilter) -> None:
        self.hub = hub
        self.filter = watch_filter
        self.limits = hub.limits
        self.partitions = watch_filter.partitions(hub.partition_count)
        self.all_partitions = len(self.partitions) == hub.partition_count
        self.watching = False  # counted by the hub, which reads its partitions
        self._fingerprint = watch_filter.fingerprint
        # Partitions where a resumed token is ahead of this hub (another router read further).
        self._ahead: set[int] = set()
        self.pending: OrderedDict[KeyId, Pending] = OrderedDict()
        self._pending_per_partition: dict[int, int] = {}
        # Offers at or before these are skipped (a resumed token may be ahead of this hub).
        self._floor: dict[int, EntryId] = {}
        # Per partition, the position passed (see the token rule in the module docstring).
        self._positions: dict[int, EntryId] = {}
        self._follows_hub = False
        self._snapshot_needed = True
        self._barrier: dict[int, EntryId] | None = None
        self.resync_reason: str | None = None
        self._versions_sent: OrderedDict[KeyId, int] = OrderedDict()
        self._wake = asyncio.Event()
        self.closed = False
        self._last_sent_s = asyncio.get_running_loop().time()
        self._token_cache: tuple[int, int, str] | None = None
        self._generation = 0

    # ------------------------------------------------------------ hub side (sync)

    def offer(self, partition: int, entry: EntryId, event: events_pb2.AvailabilityChanged) -> None:
        if self.resync_reason is not None or not self.filter.matches(event.key):
            return
        if entry <= self._floor.get(partition, ZERO):
            return
        key = (event.key.sku_id, event.key.location_id)
        if key in self.pending:
            self.pending[key] = (partition, entry, event)
            self.pending.move_to_end(key)
            self.hub.metrics.events_coalesced += 1
        elif len(self.pending) >= self.limits.subscriber_pending_keys_max:
            self.mark_resync(RESYNC_SUBSCRIBER_TOO_SLOW)
            return
        else:
            self.pending[key] = (partition, entry, event)
            self._pending_per_partition[partition] = (
                self._pending_per_partition.get(partition, 0) + 1
            )
        self._wake.set()

    def mark_resync(self, reason: str) -> None:
        """Drop what is pending; the stream sends Resync and a fresh snapshot next."""
        self.pending.clear()
        self._pending_per_partition.clear()
        self.resync_reason = reason
        self.hub.metrics.resyncs += 1
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    # --------------------------------------------------------------- stream side

    async def stream(
        self, token: ResumeToken | None
    ) -> AsyncGenerator[events_pb2.WatchEvent, None]:
        """The events of one Watch call: snapshot or catch-up, then changes and heartbeats."""
        watched: list[None] = []
        async for event in self._call_source(self._watch_call, watched):
            yield event
        if token is None or token.positions is None:
            reason = SNAPSHOT_INITIAL if token is None else SNAPSHOT_RESUME_TOKEN_TOO_OLD
            async for event in self._snapshot(reason):
                yield event
        else:
            async for event in self._resume(token.positions):
                yield event
        while True:
            if self.closed:
                raise HubClosed
            if self.resync_reason is not None:
                yield self._emit(
                    events_pb2.WatchEvent(resync=events_pb2.Resync(reason=self.resync_reason))
                )
                async for event in self._snapshot(SNAPSHOT_RESYNC):
                    yield event
                continue
            if self.pending:
                change = self._pop()
                if change is not None:
                    yield self._emit(events_pb2.WatchEvent(change=change))
                continue
            await self._wait(self._heartbeat_due_s())
            if not self.pending and self.resync_reason is None and self._heartbeat_due_s() <= 0:
                yield self._heartbeat()

    async def _resume(self, start: Mapping[int, EntryId]) -> AsyncIterator[events_pb2.WatchEvent]:
        box: list[dict[int, str]] = []

        def first_ids() -> Awaitable[dict[int, str]]:
            return self.hub.source.first_ids(None if self.all_partitions else self.partitions)

        async for event in self._call_source(first_ids, box):
            yield event
        firsts = box[0]
        too_old = [
            p for p in self.partitions if start.get(p, ZERO) < parse_entry_id(firsts.get(p, "0-0"))
        ]
        if too_old:
            async for event in self._snapshot(SNAPSHOT_RESUME_TOKEN_TOO_OLD):
                yield event
            return
        async for event in self._catch_up(start):
            yield event

    async def _catch_up(self, start: Mapping[int, EntryId]) -> AsyncIterator[events_pb2.WatchEvent]:
        """Replay each partition from the token up to the hub's positions, then go live."""
        self._register(floor={p: start.get(p, ZERO) for p in self.partitions}, follows_hub=False)
        self._snapshot_needed = False
        registered = {p: self.hub.positions.get(p, ZERO) for p in self.partitions}
        for partition in self.partitions:
            after, up_to = start.get(partition, ZERO), registered[partition]
            while after < up_to:
                box: list[list[StreamEntry]] = []
                fetch = self._range_call(partition, after, up_to)
                async for event in self._call_source(fetch, box):
                    yield event
                if self.resync_reason is not None or self.closed:
                    return  # the stream loop sends Resync and a snapshot
                for _, entry_text, changed in box[0]:
                    entry = parse_entry_id(entry_text)
                    if not after < entry <= up_to:
                        continue
                    after = entry
                    self._positions[partition] = entry
                    shown = self.hub.totals.replayed(changed)
                    if (
                        shown is not None
                        and self.filter.matches(shown.key)
                        and self._accept_change(shown)
                    ):
                        yield self._emit(events_pb2.WatchEvent(change=shown))
                if len(box[0]) < self.limits.range_entries_max:
                    break
            self._positions[partition] = max(self._positions[partition], up_to)
            self._generation += 1
        self._follows_hub = True
        for total in self.hub.totals.totals(self.filter.matches):
            if self._accept_change(total):
                yield self._emit(events_pb2.WatchEvent(change=total))

    def _watch_call(self) -> Awaitable[None]:
        return self.hub.watch(self)

    def _range_call(
        self, partition: int, after: EntryId, up_to: EntryId
    ) -> Callable[[], Awaitable[list[StreamEntry]]]:
        def call() -> Awaitable[list[StreamEntry]]:
            return self.hub.source.range(
                partition,
                format_entry_id(after),
                format_entry_id(up_to),
                self.limits.range_entries_max,
            )

        return call

    async def _snapshot(self, reason: str) -> AsyncIterator[events_pb2.WatchEvent]:
        """Register at the hub's positions, read the view, then the barrier; send in chunks."""
        self._register(floor={}, follows_hub=True)
        levels_box: list[list[tuple[pb.StockLevel, int, int]]] = []
        read = self._snapshot_call()
        async for event in self._call_source(read, levels_box):
            yield event
        barrier_box: list[dict[int, str]] = []
        read_at = time.monotonic()

        def barrier() -> Awaitable[dict[int, str]]:
            partitions = None if self.all_partitions else self.partitions
            return self.hub.last_ids_after(read_at, partitions)

        async for event in self._call_source(barrier, barrier_box):
            yield event
        if self.resync_reason is not None or self.closed:
            return
        touched = set(self.partitions)
        self._barrier = {p: parse_entry_id(i) for p, i in barrier_box[0].items() if p in touched}
        self.hub.metrics.snapshots += 1
        shown = (self.hub.totals.level(level) for level, _, _ in levels_box[0])
        levels = [level for level in shown if level is not None and self._accept_level(level)]
        size = self.limits.snapshot_levels_per_message_max
        for start in range(0, max(len(levels), 1), size):
            chunk = levels[start : start + size]
            complete = start + size >= len(levels)
            self._snapshot_needed = not complete
            snapshot = events_pb2.Snapshot(levels=chunk, complete=complete, reason=reason)
            yield self._emit(events_pb2.WatchEvent(snapshot=snapshot))

    def _snapshot_call(self) -> Callable[[], Awaitable[list[tuple[pb.StockLevel, int, int]]]]:
        def call() -> Awaitable[list[tuple[pb.StockLevel, int, int]]]:
            return self.hub.source.snapshot(
                self.filter.merchant_id,
                sorted(self.filter.location_ids),
                sorted(self.filter.sku_ids),
            )

        return call

    def _register(self, floor: dict[int, EntryId], follows_hub: bool) -> None:
        """Start buffering live entries from the hub's current positions on."""
        self.pending.clear()
        self._pending_per_partition.clear()
        self.resync_reason = None
        self._floor = floor
        self._ahead = {p for p, e in floor.items() if e > self.hub.positions.get(p, ZERO)}
        self._positions = (
            {p: max(floor.get(p, ZERO), self.hub.positions.get(p, ZERO)) for p in self.partitions}
            if follows_hub
            else dict(floor)
        )
        self._follows_hub = follows_hub
        self._snapshot_needed = True
        self._barrier = None
        self._generation += 1

    def _pop(self) -> events_pb2.AvailabilityChanged | None:
        _, (partition, entry, changed) = self.pending.popitem(last=False)
        count = self._pending_per_partition[partition] - 1
        if count:
            self._pending_per_partition[partition] = count
        else:
            del self._pending_per_partition[partition]
        self._positions[partition] = entry
        self._generation += 1
        return changed if self._accept_change(changed) else None

    def _accept_change(self, changed: events_pb2.AvailabilityChanged) -> bool:
        key = (changed.key.sku_id, changed.key.location_id)
        if changed.version <= self._versions_sent.get(key, 0):
            return False
        self._remember(key, changed.version)
        return True

    def _accept_level(self, level: pb.StockLevel) -> bool:
        key = (level.key.sku_id, level.key.location_id)
        if level.version < self._versions_sent.get(key, 0):
            return False  # the read view is behind what this stream already showed
        self._remember(key, level.version)
        return True

    def _remember(self, key: KeyId, version: int) -> None:
        self._versions_sent[key] = version
        self._versions_sent.move_to_end(key)
        # While a barrier stands the snapshot's versions are needed; past it, order suffices.
        if self._barrier is None:
            while len(self._versions_sent) > self.limits.subscriber_versions_keys_max:
                self._versions_sent.popitem(last=False)

    # ------------------------------------------------------------------ tokens

    def _position(self, partition: int) -> EntryId:
        own = self._positions.get(partition, ZERO)
        if not self._follows_hub or partition in self._pending_per_partition:
            return own
        return max(own, self.hub.positions.get(partition, ZERO))

    def token(self) -> str:
        cached = self._token_cache
        if cached is not None and cached[:2] == (self.hub.generation, self._generation):
            return cached[2]
        text = self._compute_token()
        self._token_cache = (self.hub.generation, self._generation, text)
        return text

    def _compute_token(self) -> str:
        if self._snapshot_needed or self.resync_reason is not None:
            return snapshot_token(self._fingerprint)
        if self._barrier is not None:
            if any(self._position(p) < b for p, b in self._barrier.items()):
                return snapshot_token(self._fingerprint)
            self._barrier = None
        if self._follows_hub and self.all_partitions:
            # The hub's shared encoding, and only the partitions where this one differs.
            overrides = {p: self._positions.get(p, ZERO) for p in self._pending_per_partition}
            for p in self._ahead - overrides.keys():
                overrides[p] = self._position(p)
            base = self.hub.positions_blob()
            return positions_token(self._fingerprint, base, encode_positions(overrides, True))
        positions = {p: self._position(p) for p in self.partitions}
        return positions_token(self._fingerprint, encode_positions(positions))

    # --------------------------------------------------------------- plumbing

    def _emit(self, event: events_pb2.WatchEvent) -> events_pb2.WatchEvent:
        event.resume_token = self.token()
        self._last_sent_s = asyncio.get_running_loop().time()
        if event.HasField("change"):
            self.hub.metrics.events_delivered += 1
        return event

    def _heartbeat(self) -> events_pb2.WatchEvent:
        self.hub.metrics.heartbeats += 1
        heartbeat = events_pb2.Heartbeat(server_time_ms=self.hub.clock_ms())
        return self._emit(events_pb2.WatchEvent(heartbeat=heartbeat))

    def _heartbeat_due_s(self) -> float:
        now_s = asyncio.get_running_loop().time()
        return self._last_sent_s + self.limits.heartbeat_interval_s - now_s

    async def _wait(self, timeout_s: float) -> None:
        """Until something is offered, a resync or close, or the timeout."""
        if self.pending or self.resync_reason is not None or self.closed or timeout_s <= 0:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    async def _call_source(
        self, call: Callable[[], Awaitable[T]], result: list[T]
    ) -> AsyncIterator[events_pb2.WatchEvent]:
        """Await a source call, retrying with backoff; heartbeats go out meanwhile."""
        backoff_s = self.limits.source_retry_backoff_s_initial
        while True:
            task: asyncio.Future[T] = asyncio.ensure_future(call())
            try:
                while not task.done():
                    if self.closed:
                        raise HubClosed
                    await asyncio.wait({task}, timeout=max(self._heartbeat_due_s(), 0.0))
                    if not task.done() and self._heartbeat_due_s() <= 0:
                        yield self._heartbeat()
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.wait({task})
            error = task.exception()
            if error is None:
                result.append(task.result())
                return
            if isinstance(error, SnapshotRefused):
                raise error
            self.hub.metrics.source_errors += 1
            log.warning("watch_source_call_failed", error=repr(error), backoff_s=backoff_s)
            resume_at_s = asyncio.get_running_loop().time() + backoff_s
            while (remaining_s := resume_at_s - asyncio.get_running_loop().time()) > 0:
                if self.closed:
                    raise HubClosed
                await asyncio.sleep(min(remaining_s, max(self._heartbeat_due_s(), 0.0)))
                if self._heartbeat_due_s() <= 0:
                    yield self._heartbeat()
            backoff_s = min(backoff_s * 2, self.limits.source_retry_backoff_s_max)


# ------------------------------------------------------------------------------ the RPC


def parse_request(
    request: events_pb2.WatchRequest, limits_: WatchLimits, partition_count: int
) -> tuple[WatchFilter, ResumeToken | None] | Invalid:
    """The filter and token of a request, or what is wrong with it (the core's id rules, so
    a filter accepts exactly the ids Reserve accepts)."""
    problem = validate_watch_filter(
        request.merchant_id,
        request.location_ids,
        request.sku_ids,
        location_ids_max=limits_.filter_location_ids_max,
        sku_ids_max=limits_.filter_sku_ids_max,
    )
    if problem is not None:
        return problem
    watch_filter = WatchFilter(
        request.merchant_id, frozenset(request.location_ids), frozenset(request.sku_ids)
    )
    if not request.resume_token:
        return watch_filter, None
    token = decode(request.resume_token, partition_count)
    if isinstance(token, str):
        return Invalid("resume_token", token)
    if token.fingerprint != watch_filter.fingerprint:
        return Invalid("resume_token", "issued for another filter")
    return watch_filter, token


class AvailabilityStreamService(events_pb2_grpc.AvailabilityStreamServicer):
    def __init__(self, hub: WatchHub) -> None:
        self._hub = hub

    async def Watch(  # noqa: N802 (the RPC's name)
        self, request: events_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.WatchEvent]:
        parsed = parse_request(request, self._hub.limits, self._hub.partition_count)
        if isinstance(parsed, Invalid):
            await abort(context, errors.rejection_to_status(parsed))
        watch_filter, token = parsed
        subscriber = self._hub.subscribe(watch_filter)
        if isinstance(subscriber, CapacityExhausted):
            await abort(context, errors.rejection_to_status(subscriber))
        try:
            async for event in subscriber.stream(token):
                yield event
        except SnapshotRefused as refused:
            exhausted = CapacityExhausted("snapshot_keys_max", refused.limit)
            await abort(context, errors.rejection_to_status(exhausted))
        except HubClosed:
            message = "router stopping: resume elsewhere with the last token"
            await abort(context, errors.server_stopping(message))
        finally:
            self._hub.unsubscribe(subscriber)
