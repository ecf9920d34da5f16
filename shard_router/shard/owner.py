"""The partition owner: one serial loop that turns requests into durable answers.

    submit() -> bounded queue -> [reads] -> core.apply -> flush -> replies -> events

Ordering rules of ``_pump`` (one screen, on purpose):
  1. Reads of a batch are answered first, while memory equals what is durable: a read never
     shows state that a failed flush could lose.
  2. Work whose deadline passed is answered DEADLINE_EXCEEDED and not applied.
  3. Every mutation of the batch is applied to the core; the records of all of them are
     flushed in one transaction (group commit: the next batch is whatever queued meanwhile).
  4. Replies leave only after the flush commits; events are handed on after that.
  5. If the flush fails, its outcome is unknown: every partition it touched is dropped from
     memory and recovered from PostgreSQL in the background (fail-stop), and the waiting
     callers get UNAVAILABLE. They retry with the same idempotency key, which finds the
     durable answer or runs afresh.
Checkpoints are taken between batches (memory == durable) and written in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from inventory_core import (
    AvailabilityChanged,
    CheckpointDelta,
    ClientCommand,
    InventoryKey,
    Outcome,
    Partition,
    Record,
    Reservation,
    StockLevel,
)

log = structlog.get_logger(__name__)


# ------------------------------------------------------------------------------ answers


class NotOwner(Exception):
    """This process does not own (or is recovering) the partition: retry, maybe elsewhere."""

    def __init__(self, partition: int, recovering: bool) -> None:
        state = "recovering" if recovering else "not owned here"
        super().__init__(f"partition {partition} is {state}")
        self.partition = partition
        self.recovering = recovering


class Overloaded(Exception):
    """The request queue is full: load is shed rather than buffered without bound."""


class DeadlineExpired(Exception):
    """The caller's deadline passed before the work was applied; nothing was applied."""


class FlushFailed(Exception):
    """The batch holding this request did not become durable (or its fate is unknown)."""


# ------------------------------------------------------------------------------- seams


class Store(Protocol):
    """What the owner needs from persistence (persistence.store.PartitionStore)."""

    async def flush(
        self,
        records: Sequence[Record],
        epochs: dict[int, int],
        flushed_heads: dict[int, int],
        events: Sequence[AvailabilityChanged] = (),
    ) -> None: ...

    async def write_checkpoint(
        self, deltas: Sequence[CheckpointDelta], epochs: dict[int, int]
    ) -> None: ...

    async def load(self, partitions: Sequence[int]) -> dict[int, Partition]: ...

    async def epochs(self, partitions: Sequence[int]) -> dict[int, int]: ...


class EventSink(Protocol):
    def publish(self, events: Sequence[AvailabilityChanged], committed_at_ms: int) -> None: ...


class NoEvents:
    def publish(self, events: Sequence[AvailabilityChanged], committed_at_ms: int) -> None:
        return None


@dataclass(frozen=True, slots=True)
class OwnerLimits:
    """Every bound of the loop; each must be positive (0 would mean unbounded to asyncio)."""

    # Requests waiting for the loop. At ~20k requests/s per process, 10,000 is half a second
    # of work: beyond that, answering RESOURCE_EXHAUSTED beats queueing past deadlines.
    request_queue_max: int = 10_000
    # Requests per batch (one flush). Bounds a transaction to a few MiB and a batch's
    # latency to a few milliseconds of core work.
    flush_batch_requests_max: int = 2_000
    # The expiry timer's period: expired units return to sale within about this long.
    expiry_tick_s: float = 0.2
    # Checkpoint when this many records were flushed since the last one, or this long passed:
    # bounds the ledger tail replayed at recovery.
    checkpoint_records_max: int = 50_000
    checkpoint_interval_s: float = 5.0
    # Rows (keys, reservations, idempotency entries) per checkpoint transaction: a few
    # milliseconds of encoding, so the loop keeps replying while a big checkpoint is written.
    checkpoint_transaction_rows_max: int = 5_000
    # Recovery retries a failing database with exponential backoff up to this period.
    recovery_backoff_s_max: float = 5.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if not getattr(self, name) > 0:
                raise ValueError(f"OwnerLimits.{name} must be positive")


@dataclass(slots=True)
class _Owned:
    core: Partition
    epoch: int
    flushed_lsn: int


@dataclass(slots=True)
class _Work:
    partition: int
    operation: ClientCommand | _ReadLevels | _ReadReservation | _ExpireTick
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[object] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(frozen=True, slots=True)
class _ReadLevels:
    keys: tuple[InventoryKey, ...]


@dataclass(frozen=True, slots=True)
class _ReadReservation:
    merchant_id: str
    reservation_id: str


@dataclass(frozen=True, slots=True)
class _ExpireTick:
    pass


class WallClock:
    """Unix epoch ms that never goes backwards within the process."""

    def __init__(self) -> None:
        self._last_ms = 0

    def now_ms(self) -> int:
        self._last_ms = max(self._last_ms, int(time.time() * 1000))
        return self._last_ms


class Owner:
    def __init__(
        self,
        store: Store,
        events: EventSink | None = None,
        limits: OwnerLimits | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self._events = events or NoEvents()
        self.limits = limits or OwnerLimits()
        self._now_ms = clock or WallClock().now_ms
        self._queue: asyncio.Queue[_Work] = asyncio.Queue(self.limits.request_queue_max)
        self._owned: dict[int, _Owned] = {}
        # Partitions being reloaded after a failed flush, with the epoch we held.
        self._recovering: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._checkpointing: asyncio.Task[None] | None = None
        self._records_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._dirty: set[int] = set()
        self.stats = OwnerStats()
        # Until when (time.monotonic()) this process may act as owner without hearing from
        # the database: a process that was paused past it serves nothing until its next
        # heartbeat and epoch check (ownership.py). Unbounded when no lease is kept.
        self.lease_valid_until = math.inf
        # Partitions with an expiry tick waiting in the queue (one each at most).
        self._ticks_queued: set[int] = set()

    # -------------------------------------------------------------------------- the API

    async def mutate(
        self, partition: int, command: ClientCommand, deadline: float | None
    ) -> Outcome:
        result = await self._submit(_Work(partition, command, deadline))
        assert not isinstance(result, BaseException)
        return result  # type: ignore[return-value]

    async def levels(
        self, partition: int, keys: tuple[InventoryKey, ...], deadline: float | None
    ) -> tuple[StockLevel, ...]:
        return await self._submit(_Work(partition, _ReadLevels(keys), deadline))  # type: ignore[return-value]

    async def reservation(
        self, partition: int, merchant_id: str, reservation_id: str, deadline: float | None
    ) -> Reservation | None:
        work = _Work(partition, _ReadReservation(merchant_id, reservation_id), deadline)
        return await self._submit(work)  # type: ignore[return-value]

    def owns(self, partition: int) -> bool:
        return partition in self._owned

    @property
    def owned_partitions(self) -> list[int]:
        return sorted(self._owned)

    def epoch_of(self, partition: int) -> int | None:
        owned = self._owned.get(partition)
        return None if owned is None else owned.epoch

    @property
    def recovering_partitions(self) -> list[int]:
        return sorted(self._recovering)

    def adopt(self, partitions: dict[int, Partition], epochs: dict[int, int]) -> None:
        for partition, core in partitions.items():
            self._owned[partition] = _Owned(core, epochs[partition], core.head_lsn)
            self._recovering.pop(partition, None)

    def drop(self, partitions: Sequence[int]) -> None:
        for partition in partitions:
            self._owned.pop(partition, None)
            self._dirty.discard(partition)

    # -------------------------------------------------------------------------- running

    async def run(self) -> None:
        """The loop and its timer; runs until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._expiry_timer())
            while True:
                batch = await self._take_batch()
                try:
                    await self._pump(batch)
                finally:
                    for _ in batch:
                        self._queue.task_done()
                self._maybe_checkpoint()

    async def close(self) -> None:
        """Finish background work: the last checkpoint and any recovery."""
        if self._checkpointing is not None:
            with contextlib.suppress(Exception):
                await self._checkpointing
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------------- the loop

    async def _submit(self, work: _Work) -> object:
        if work.partition not in self._owned:
            raise NotOwner(work.partition, work.partition in self._recovering)
        try:
            self._queue.put_nowait(work)
        except asyncio.QueueFull:
            self.stats.shed += 1
            raise Overloaded(f"request queue full ({self.limits.request_queue_max})") from None
        result = await work.future
        if isinstance(result, BaseException):
            raise result
        return result

    async def _take_batch(self) -> list[_Work]:
        batch = [await self._queue.get()]
        while len(batch) < self.limits.flush_batch_requests_max and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _pump(self, batch: list[_Work]) -> None:
        now_ms, now = self._now_ms(), time.monotonic()
        writes: list[tuple[_Work, Outcome]] = []
        records: list[Record] = []
        events: list[AvailabilityChanged] = []
        flushed_heads: dict[int, int] = {}
        lease_lapsed = now > self.lease_valid_until
        for work in batch:
            if isinstance(work.operation, _ExpireTick):
                self._ticks_queued.discard(work.partition)
        for work in sorted(batch, key=_reads_first):
            owned = None if lease_lapsed else self._owned.get(work.partition)
            if owned is None:
                _answer(work, NotOwner(work.partition, work.partition in self._recovering))
            elif work.deadline is not None and work.deadline <= now:
                _answer(work, DeadlineExpired())
            elif isinstance(work.operation, _ReadLevels):
                _answer(work, owned.core.levels(work.operation.keys, now_ms))
            elif isinstance(work.operation, _ReadReservation):
                op = work.operation
                _answer(work, owned.core.reservation(op.merchant_id, op.reservation_id, now_ms))
            else:
                flushed_heads.setdefault(work.partition, owned.flushed_lsn)
                step = self._apply(owned.core, work.operation, now_ms)
                writes.append((work, step.outcome))
                records.extend(step.records)
                events.extend(step.events)
        if not records:
            for work, outcome in writes:
                _answer(work, outcome)
            return
        touched = sorted(flushed_heads)
        try:
            epochs = {p: self._owned[p].epoch for p in touched}
            started = time.monotonic()
            await self._store.flush(records, epochs, flushed_heads, events)
        except Exception as error:  # unknown outcome: fail-stop these partitions
            log.error("flush_failed", partitions=touched, records=len(records), error=repr(error))
            self.stats.flush_failures += 1
            self._fail_stop(touched)
            for work, _ in writes:
                _answer(work, FlushFailed(f"flush failed: {error!r}"))
            return
        self.stats.observe_flush(len(records), time.monotonic() - started)
        for partition in touched:
            owned = self._owned.get(partition)  # absent if dropped during the flush
            if owned is not None:
                owned.flushed_lsn = owned.core.head_lsn
        self._dirty.update(p for p in touched if p in self._owned)
        self._records_since_checkpoint += len(records)
        for work, outcome in writes:
            _answer(work, outcome)
        self._events.publish(events, self._now_ms())

    def _apply(self, core: Partition, operation: object, now_ms: int) -> _StepLike:
        if isinstance(operation, _ExpireTick):
            return core.expire_due(now_ms)
        return core.apply(replace(operation, now_ms=now_ms))  # type: ignore[arg-type, type-var]

    # ---------------------------------------------------------------- timer and recovery

    async def _expiry_timer(self) -> None:
        while True:
            await asyncio.sleep(self.limits.expiry_tick_s)
            now_ms = self._now_ms()
            for partition, owned in list(self._owned.items()):
                due = owned.core.next_expiry_ms()
                if due is None or due > now_ms or partition in self._ticks_queued:
                    continue
                if self._queue.full():
                    break  # any command expires what is due first; the next tick retries
                self._ticks_queued.add(partition)  # at most one tick per partition queued
                self._queue.put_nowait(_Work(partition, _ExpireTick(), None))

    def _fail_stop(self, partitions: list[int]) -> None:
        for partition in partitions:
            owned = self._owned.pop(partition, None)
            self._dirty.discard(partition)
            if owned is not None:  # not dropped meanwhile
                self._recovering[partition] = owned.epoch
        task = asyncio.create_task(self._recover(partitions))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self, partitions: list[int]) -> None:
        """Reload from PostgreSQL what a failed flush may have left wrong in memory."""
        backoff_s = 0.05
        while True:
            try:
                epochs = await self._store.epochs(partitions)
                loaded = await self._store.load(partitions)
                break
            except Exception as error:
                log.warning("recovery_retry", partitions=partitions, error=repr(error))
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.limits.recovery_backoff_s_max)
        fenced = [p for p in partitions if epochs.get(p) != self._recovering.get(p)]
        for partition in fenced:  # another owner took it: it is theirs now
            self._recovering.pop(partition, None)
        still_ours = {p: c for p, c in loaded.items() if p in self._recovering}
        self.adopt(still_ours, epochs)
        log.info("partitions_recovered", partitions=sorted(still_ours), fenced=fenced)

    # ----------------------------------------------------------------------- checkpoints

    def _maybe_checkpoint(self) -> None:
        due = (
            self._records_since_checkpoint >= self.limits.checkpoint_records_max
            or time.monotonic() - self._last_checkpoint >= self.limits.checkpoint_interval_s
        )
        if not due or not self._dirty or self._checkpointing is not None:
            return
        deltas = [self._owned[p].core.take_checkpoint() for p in sorted(self._dirty)]
        epochs = {d.partition: self._owned[d.partition].epoch for d in deltas}
        self._dirty.clear()
        self._records_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpointing = asyncio.create_task(self._write_checkpoint(deltas, epochs))

    async def _write_checkpoint(
        self, deltas: list[CheckpointDelta], epochs: dict[int, int]
    ) -> None:
        """Write the deltas in transactions of bounded size, one after the other.

        A partition's delta is never split (it must land at one lsn), but a checkpoint after
        a bulk load spans a million rows: encoding that in one go would hold the event loop
        (and every reply) for seconds, so groups of partitions go one transaction each.
        """
        remaining = list(deltas)
        try:
            while remaining:
                group = _take_rows(remaining, self.limits.checkpoint_transaction_rows_max)
                await self._store.write_checkpoint(
                    group, {d.partition: epochs[d.partition] for d in group}
                )
                remaining = remaining[len(group) :]
            self.stats.checkpoints += 1
        except Exception as error:
            log.warning("checkpoint_failed", partitions=len(remaining), error=repr(error))
            for delta in remaining:
                owned = self._owned.get(delta.partition)
                if owned is not None:
                    owned.core.checkpoint_failed()
                    self._dirty.add(delta.partition)
        finally:
            self._checkpointing = None

    async def checkpoint_now(self) -> None:
        """Write a checkpoint of everything dirty (at shutdown, and for tests)."""
        if self._checkpointing is not None:
            await self._checkpointing
        self._records_since_checkpoint = self.limits.checkpoint_records_max
        self._maybe_checkpoint()
        if self._checkpointing is not None:
            await self._checkpointing

    async def drain(self) -> None:
        """Wait until every queued request has been answered."""
        await self._queue.join()

    def gauges(self) -> dict[str, int]:
        """Point-in-time figures for the periodic stats log and health views."""
        cores = [owned.core for owned in self._owned.values()]
        return {
            "queue_depth": self._queue.qsize(),
            "partitions_owned": len(cores),
            "partitions_recovering": len(self._recovering),
            "keys": sum(core.key_count for core in cores),
            "live_reservations": sum(core.live_reservation_count for core in cores),
            "over_committed_keys": sum(len(core.over_committed()) for core in cores),
        }

    def queue_depth(self) -> int:
        return self._queue.qsize()


@dataclass(slots=True)
class OwnerStats:
    flushes: int = 0
    records_flushed: int = 0
    flush_seconds_total: float = 0.0
    flush_failures: int = 0
    checkpoints: int = 0
    shed: int = 0

    # The slowest flush since the stats line last reset it: tail latency shows here first.
    flush_seconds_max: float = 0.0

    def observe_flush(self, records: int, seconds: float) -> None:
        self.flushes += 1
        self.records_flushed += records
        self.flush_seconds_total += seconds
        self.flush_seconds_max = max(self.flush_seconds_max, seconds)


class _StepLike(Protocol):
    @property
    def outcome(self) -> Outcome: ...
    @property
    def records(self) -> tuple[Record, ...]: ...
    @property
    def events(self) -> tuple[AvailabilityChanged, ...]: ...


def _take_rows(deltas: list[CheckpointDelta], rows_max: int) -> list[CheckpointDelta]:
    """The longest prefix of deltas within rows_max rows (at least one delta)."""
    group: list[CheckpointDelta] = []
    rows = 0
    for delta in deltas:
        size = delta.row_count
        if group and rows + size > rows_max:
            break
        group.append(delta)
        rows += size
    return group


def _reads_first(work: _Work) -> int:
    return 0 if isinstance(work.operation, _ReadLevels | _ReadReservation) else 1


def _answer(work: _Work, value: object) -> None:
    if not work.future.done():  # the caller may have gone (cancelled)
        work.future.set_result(value)
