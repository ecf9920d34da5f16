"""The event publisher: the owner's EventSink, and the outbox relay from the ledger to Redis.

    owner loop --publish()--> bounded buffer --run()--> Redis script (stream + read view)
    ledger_batches.changes --catch-up--> same script;  cursors --every interval--> published_lsn

How it works (DESIGN section 8). The ledger is the outbox: every flushed record keeps its
changes, so Redis only ever holds copies, and any gap is refilled from PostgreSQL.

- ``publish`` runs inside the owner loop right after a flush. The owner encoded each change
  once, before the flush (its protobuf payload, ``PartitionStore.encode_changes``): the
  ledger stored those payloads, and ``publish`` frames the same bytes as the apply script's
  keys and arguments (``encode_change``), appends them to a per-partition buffer and
  returns. It never waits and never raises. When the
  buffer would exceed ``publish_buffer_events_max`` it drops everything buffered (and the
  new changes) and marks those partitions as needing catch-up.
- ``run`` (one long-running task; cancel it to stop, then ``close``) sends buffered changes
  of *clean* partitions as script calls assembled from those encoded parts (a flush's
  changes make one call, up to ``script_batch_events_max``), all calls of a round trip in
  one write (``send_commands``), and advances an in-memory published cursor per partition
  ("every change with lsn <= cursor is in Redis"). Every
  ``published_lsn_flush_interval_s`` the cursors are written to ``partitions.published_lsn``
  (advisory: republishing is harmless, the stream ids make duplicates no-ops).
- A partition is *dirty* when its buffer may have a gap: changes were dropped (overflow, a
  failed send) or it was never caught up since this process started publishing it. Its
  live changes stay buffered, unsent, until a catch-up pass republishes its ledger from
  ``published_lsn`` to the head read at the start of the pass; then the buffered changes at
  or below that head are discarded, the rest follow in order, and the partition is clean.
  Per partition, changes reach the stream in lsn order (the script refuses a lower id).
- Catch-up runs every ``catch_up_interval_s`` and at once after a drop or a Redis error;
  it also publishes records that made no change, so ``published_lsn`` reaches the head.
- Redis down: ``publish`` still only buffers (then drops and marks); ``run`` backs off
  between ``redis_backoff_s_min`` and ``redis_backoff_s_max`` and then catches up.

Republished changes are the stored payloads byte for byte (committed_at_ms included: the
time the owner sent the batch to commit). Changes converted from releases before migration
0005 carry their record's time instead: those did not store it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from inventory_core import AvailabilityChanged

from .ledger import decode_changes
from .readview import EncodedChange, apply_command, encode_change, send_commands, stamp_command
from .store import LOCK_IN_ORDER

__all__ = ["EventPublisher", "PublisherLimits", "PublisherStats"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PublisherLimits:
    # Changes waiting for Redis. At ~20k changes/s per shard this is five seconds of
    # changes (~45 MiB, encoded: ~440 bytes each as measured with tracemalloc): rides out a
    # Redis blip; beyond it, the ledger is the cheaper copy.
    publish_buffer_events_max: int = 100_000
    # Changes per script call: the script holds Redis for ~2 us per change, so 200 keeps
    # every other client's wait under a millisecond.
    script_batch_events_max: int = 200
    # Script calls per pipelined round trip (so up to 3,200 changes per trip).
    send_pipeline_batches_max: int = 16
    # Entries kept per partition stream (MAXLEN ~). 100k per partition is hours of a busy
    # partition's changes: room for a subscriber to reconnect and resume.
    events_stream_length_max: int = 100_000
    # How often cursors are written to partitions.published_lsn: one small UPDATE a second;
    # a crash republishes at most a second of changes.
    published_lsn_flush_interval_s: float = 1.0
    # How often the ledger is checked for unpublished records even when nothing failed
    # (another owner's leftovers after a takeover, records that made no change).
    catch_up_interval_s: float = 10.0
    # How often "everything committed before T is in the read view" is stamped per partition
    # (inv:asof:{p}), so EVENTUAL readers can state how stale they may be: about this much
    # when the publisher keeps up, growing when it does not.
    freshness_interval_s: float = 0.5
    # Ledger records read per catch-up query (rows that start within this many records, so
    # at most one flush's records more): a few MiB of changes at most.
    catch_up_page_records_max: int = 1_000
    # Waits after a failure, doubling from min to max: quick recovery from a blip without
    # hammering a server that is down.
    redis_backoff_s_min: float = 0.05
    redis_backoff_s_max: float = 2.0
    # Connect and command timeout of the publisher's Redis client (local server: ms).
    redis_command_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


@dataclass(slots=True)
class PublisherStats:
    """Counters since start, and gauges, for logs and metrics."""

    events_published: int = 0  # stream entries appended (live and catch-up)
    duplicates_skipped: int = 0  # stream entries refused: already there
    levels_written: int = 0  # read-view hashes that moved forward
    catch_ups: int = 0  # catch-up passes completed
    catch_up_records: int = 0  # ledger records read by catch-up
    redis_errors: int = 0
    database_errors: int = 0
    unexpected_errors: int = 0  # bugs: logged with their traceback
    buffer_drops: int = 0  # changes dropped from the buffer (republished by catch-up)
    buffered_events: int = 0  # gauge
    partitions_needing_catch_up: int = 0  # gauge
    lag_ms_last: int = 0  # commit to Redis, of the newest live change sent
    lag_ms_max: int = 0  # the largest lag_ms_last seen
    lag_ms_by_partition: dict[int, int] = field(default_factory=dict)


class _RedisUnavailable(Exception):
    pass


class _DatabaseUnavailable(Exception):
    pass


_REDIS_ERRORS = (redis.RedisError, OSError, TimeoutError)
_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class EventPublisher:
    """Implements the owner's ``EventSink``. See the module docstring for the rules."""

    def __init__(
        self,
        redis_url: str,
        pool: asyncpg.Pool,
        shard_id: str,
        limits: PublisherLimits | None = None,
        clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        self.limits = limits or PublisherLimits()
        self.stats = PublisherStats()
        self._pool = pool
        self._shard_id = shard_id
        self._clock_ms = clock_ms
        timeout_s = self.limits.redis_command_timeout_s
        self._redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=0),  # run() owns retries and backoff
            protocol=2,
        )
        self._buffers: dict[int, deque[EncodedChange]] = {}
        self._buffered = 0
        # partition -> generation at which it was (last) marked dirty
        self._dirty: dict[int, int] = {}
        self._generation = 0
        self._cursors: dict[int, int] = {}  # every change with lsn <= cursor is in Redis
        self._written: dict[int, int] = {}  # cursors as last written to published_lsn
        self._catch_up_wanted = True
        self._wakeup = asyncio.Event()

    # ------------------------------------------------------------------ the owner's side

    def publish(
        self,
        events: Sequence[AvailabilityChanged],
        payloads: Sequence[bytes],
        committed_at_ms: int,
    ) -> None:
        """Buffer one flushed batch's changes, around the payloads the ledger stored.
        Never blocks, never raises."""
        try:
            if not events:
                return
            if self._buffered + len(events) > self.limits.publish_buffer_events_max:
                self._drop_all({event.partition for event in events}, len(events))
                return
            record: tuple[int, int] | None = None
            index = 0
            for event, payload in zip(events, payloads, strict=True):
                at = (event.partition, event.lsn)
                index = index + 1 if at == record else 0  # a record's changes are adjacent
                record = at
                queue = self._buffers.get(event.partition)
                if queue is None:
                    queue = self._buffers[event.partition] = deque()
                queue.append(encode_change(event, index, committed_at_ms, payload))
                if event.partition not in self._cursors:
                    self._mark_dirty(event.partition, gap=False)
            self._buffered += len(events)  # on an exception, _drop_all below resets it
            self._wakeup.set()
        except Exception:
            log.exception("event_publish_failed", events=len(events))
            self.stats.unexpected_errors += 1
            with contextlib.suppress(Exception):
                self._drop_all({event.partition for event in events}, len(events))
        finally:
            self._update_gauges()

    def partitions_acquired(self, partitions: Iterable[int]) -> None:
        """Forget what is known of these partitions: another owner may have written them
        since. Call after acquiring partitions (before serving them). Never raises."""
        for partition in partitions:
            self._cursors.pop(partition, None)
            self._mark_dirty(partition, gap=True)
        self._wakeup.set()

    def _drop_all(self, partitions: set[int], incoming: int) -> None:
        dropped = self._buffered + incoming
        for partition in [*self._buffers, *partitions]:
            self._mark_dirty(partition, gap=True)
        self._buffers.clear()
        self._buffered = 0
        self.stats.buffer_drops += dropped
        log.warning("event_buffer_overflow", dropped=dropped, partitions=len(self._dirty))
        self._wakeup.set()

    def _mark_dirty(self, partition: int, gap: bool) -> None:
        """gap: changes were lost after the current cursor (a pass already under way must
        not clean the partition); otherwise the partition is only not yet caught up."""
        self._catch_up_wanted = True
        if gap or partition not in self._dirty:
            self._generation += 1
            self._dirty[partition] = self._generation

    # ------------------------------------------------------------------------ the task

    async def run(self) -> None:
        """Send, catch up and record progress until cancelled. Never returns otherwise."""
        limits = self.limits
        backoff_s = limits.redis_backoff_s_min
        next_catch_up_s = time.monotonic()
        next_flush_s = time.monotonic() + limits.published_lsn_flush_interval_s
        next_fresh_s = time.monotonic()
        while True:
            failed = False
            if self._catch_up_wanted or time.monotonic() >= next_catch_up_s:
                next_catch_up_s = time.monotonic() + limits.catch_up_interval_s
                failed = not await self._attempt(self._catch_up())
            if not failed and self._ready_partitions():
                failed = not await self._attempt(self._send_ready())
            if time.monotonic() >= next_flush_s:
                next_flush_s = time.monotonic() + limits.published_lsn_flush_interval_s
                await self._attempt(self._flush_published())
            if not failed and time.monotonic() >= next_fresh_s:
                next_fresh_s = time.monotonic() + limits.freshness_interval_s
                failed = not await self._attempt(self._stamp_freshness())
            self._update_gauges()
            if failed:
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, limits.redis_backoff_s_max)
                continue
            backoff_s = limits.redis_backoff_s_min
            self._wakeup.clear()
            if self._ready_partitions() or self._catch_up_wanted:
                await asyncio.sleep(0)  # let the owner loop run between round trips
                continue
            wait_s = min(next_catch_up_s, next_flush_s, next_fresh_s) - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), max(wait_s, 0.0))

    async def close(self) -> None:
        """After cancelling run(): record progress (best effort) and close the client."""
        with contextlib.suppress(*_DATABASE_ERRORS):
            await self._flush_published()
        await self._redis.aclose()

    async def _stamp_freshness(self) -> None:
        """For every partition this publisher keeps up: all committed before T is in Redis,
        where T is the commit time of its oldest unsent change, or now when none waits."""
        now_ms = self._clock_ms()
        stamps = {}
        for partition in self._cursors:
            if partition in self._dirty:
                continue  # behind: its stamp stays where it was, and ages
            queue = self._buffers.get(partition)
            stamps[partition] = queue[0].committed_at_ms if queue else now_ms
        if not stamps:
            return
        try:
            (answer,) = await send_commands(self._redis, [stamp_command(stamps)])
        except _REDIS_ERRORS as error:
            raise _RedisUnavailable from error
        if isinstance(answer, Exception):
            raise _RedisUnavailable from answer

    def lag_ms(self) -> int:
        """How long the oldest buffered change has waited since its commit (0: none)."""
        oldest = [queue[0].committed_at_ms for queue in self._buffers.values() if queue]
        return max(0, self._clock_ms() - min(oldest)) if oldest else 0

    async def _attempt(self, step: Coroutine[Any, Any, None]) -> bool:
        try:
            await step
        except _RedisUnavailable as error:
            self.stats.redis_errors += 1
            self._catch_up_wanted = True
            log.warning("event_redis_unavailable", error=repr(error.__cause__))
            return False
        except _DatabaseUnavailable as error:
            self.stats.database_errors += 1
            self._catch_up_wanted = True
            log.warning("event_database_unavailable", error=repr(error.__cause__))
            return False
        except Exception:
            self.stats.unexpected_errors += 1
            self._catch_up_wanted = True
            log.exception("event_publisher_step_failed")
            return False
        return True

    # ---------------------------------------------------------------------- live sends

    def _ready_partitions(self) -> list[int]:
        return [p for p, queue in self._buffers.items() if queue and p not in self._dirty]

    async def _send_ready(self) -> None:
        budget = self.limits.script_batch_events_max * self.limits.send_pipeline_batches_max
        taken: dict[int, list[EncodedChange]] = {}
        for partition in self._ready_partitions():
            queue = self._buffers.pop(partition)
            count = min(len(queue), budget)
            taken[partition] = [queue.popleft() for _ in range(count)]
            self._buffered -= count
            budget -= count
            if queue:  # to the back of the line: partitions take turns
                self._buffers[partition] = queue
            if budget == 0:
                break
        try:
            await self._send([entry for entries in taken.values() for entry in entries])
        except _RedisUnavailable:
            for partition in taken:
                self._mark_dirty(partition, gap=True)
            raise
        now_ms = self._clock_ms()
        for partition, entries in taken.items():
            last = entries[-1]
            rest = self._buffers.get(partition)
            # A record's changes may straddle two sends: only a whole record is published.
            complete = not rest or rest[0].lsn != last.lsn
            self._advance(partition, last.lsn if complete else last.lsn - 1)
            lag_ms = max(0, now_ms - last.committed_at_ms)
            self.stats.lag_ms_by_partition[partition] = lag_ms
            self.stats.lag_ms_last = lag_ms
            self.stats.lag_ms_max = max(self.stats.lag_ms_max, lag_ms)

    async def _send(self, changes: Sequence[EncodedChange]) -> None:
        """Apply changes in order: script calls of ``script_batch_events_max``, up to
        ``send_pipeline_batches_max`` of them per round trip; _RedisUnavailable on failure."""
        batch = self.limits.script_batch_events_max
        trip = batch * self.limits.send_pipeline_batches_max
        cap = self.limits.events_stream_length_max
        for start in range(0, len(changes), trip):
            end = min(start + trip, len(changes))
            commands = [
                apply_command(changes[offset : min(offset + batch, end)], cap)
                for offset in range(start, end, batch)
            ]
            try:
                answers = await send_commands(self._redis, commands)
            except _REDIS_ERRORS as error:
                raise _RedisUnavailable() from error
            for answer in answers:
                if isinstance(answer, Exception):  # a script error: caught up from the ledger
                    raise _RedisUnavailable() from answer
                appended, duplicates, written = answer
                self.stats.events_published += int(appended)
                self.stats.duplicates_skipped += int(duplicates)
                self.stats.levels_written += int(written)

    def _advance(self, partition: int, lsn: int) -> None:
        if lsn > self._cursors.get(partition, -1):
            self._cursors[partition] = lsn

    # ------------------------------------------------------------------------ catch-up

    async def _catch_up(self) -> None:
        """Republish every owned partition's unpublished ledger range; clean the dirty."""
        self._catch_up_wanted = False
        try:
            await self._redis.ping()
        except _REDIS_ERRORS as error:
            raise _RedisUnavailable() from error
        started = self._generation
        owned = await self._owned()
        self._forget_unowned(owned, started)
        for partition, (published_lsn, head_lsn) in sorted(owned.items()):
            cursor = self._cursors.get(partition)
            known = partition not in self._dirty and cursor is not None
            after = max(published_lsn, cursor) if known and cursor is not None else published_lsn
            if after < head_lsn:
                try:
                    await self._replay(partition, after, head_lsn)
                except _RedisUnavailable:
                    self._mark_dirty(partition, gap=True)
                    raise
            self._caught_up(partition, head_lsn, started)
        self.stats.catch_ups += 1

    async def _owned(self) -> dict[int, tuple[int, int]]:
        try:
            rows = await self._pool.fetch(
                """SELECT partition, published_lsn, head_lsn FROM partitions
                    WHERE owner = $1""",
                self._shard_id,
            )
        except _DATABASE_ERRORS as error:
            raise _DatabaseUnavailable() from error
        return {r["partition"]: (r["published_lsn"], r["head_lsn"]) for r in rows}

    def _forget_unowned(self, owned: dict[int, tuple[int, int]], started: int) -> None:
        """Partitions another owner holds are its publisher's: drop what we had of them."""
        for partition in [p for p in self._cursors if p not in owned]:
            del self._cursors[partition]
        for partition, generation in list(self._dirty.items()):
            if partition not in owned and generation <= started:
                del self._dirty[partition]
                self._discard(partition, None)

    def _caught_up(self, partition: int, head_lsn: int, started: int) -> None:
        self._discard(partition, head_lsn)
        self._advance(partition, head_lsn)
        if self._dirty.get(partition, started) <= started:
            self._dirty.pop(partition, None)
        else:
            self._catch_up_wanted = True  # lost more during this pass: go again

    def _discard(self, partition: int, up_to_lsn: int | None) -> None:
        """Drop buffered changes with lsn <= up_to_lsn (all when None): already published."""
        queue = self._buffers.get(partition)
        while queue and (up_to_lsn is None or queue[0].lsn <= up_to_lsn):
            queue.popleft()
            self._buffered -= 1
        if queue is not None and not queue:
            del self._buffers[partition]

    async def _replay(self, partition: int, after_lsn: int, head_lsn: int) -> None:
        page = self.limits.catch_up_page_records_max
        while after_lsn < head_lsn:
            try:
                rows = await self._pool.fetch(
                    """SELECT first_lsn, last_lsn, changes FROM ledger_batches
                        WHERE partition = $1 AND last_lsn > $2 AND first_lsn <= $3
                          AND first_lsn <= $2 + $4
                        ORDER BY last_lsn""",
                    partition,
                    after_lsn,
                    head_lsn,
                    page,
                )
            except _DATABASE_ERRORS as error:
                raise _DatabaseUnavailable() from error
            if not rows:
                raise AssertionError(
                    f"partition {partition}: ledger has no records in ({after_lsn}, {head_lsn}]"
                )
            changes: list[EncodedChange] = []
            records = 0
            for row in rows:
                stored = decode_changes(
                    partition, row["first_lsn"], row["last_lsn"], row["changes"]
                )
                for lsn, record_changes in stored:
                    if after_lsn < lsn <= head_lsn:
                        changes.extend(record_changes)
                        records += 1
            await self._send(changes)
            after_lsn = min(rows[-1]["last_lsn"], head_lsn)
            self.stats.catch_up_records += records
            self._advance(partition, after_lsn)

    # --------------------------------------------------------------------- published_lsn

    async def _flush_published(self) -> None:
        pending = {p: lsn for p, lsn in self._cursors.items() if lsn > self._written.get(p, 0)}
        if not pending:
            return
        partitions = sorted(pending)
        try:
            # Rows are locked in partition order, as every flush does: no deadlock with it.
            await self._pool.execute(
                f"""{LOCK_IN_ORDER}
                   UPDATE partitions AS p
                      SET published_lsn = GREATEST(p.published_lsn, v.lsn)
                     FROM locked, unnest($1::integer[], $2::bigint[]) AS v(partition, lsn)
                    WHERE p.partition = locked.partition AND p.partition = v.partition
                      AND p.published_lsn < v.lsn AND p.head_lsn >= v.lsn""",
                partitions,
                [pending[p] for p in partitions],
            )
        except _DATABASE_ERRORS as error:
            raise _DatabaseUnavailable() from error
        self._written.update(pending)

    def _update_gauges(self) -> None:
        self.stats.buffered_events = self._buffered
        self.stats.partitions_needing_catch_up = len(self._dirty)
