"""The partition owner: one serial loop that turns requests into durable answers.

    submit() -> bounded queue -> [reads] -> core.apply -> flush -> replies -> events

The flush is pipelined (DESIGN section 5.6): while batch N's flush is in flight, the loop
applies batch N+1; then it waits for N, and starts N+1's flush. Ordering rules (one screen,
on purpose):
  1. Reads of a batch are served before its writes are applied. A read of a partition that
     the flush in flight touches is held until that flush commits (and refused, retryably,
     if it fails): a read never shows state that a failed flush could lose, and waits at
     most for the flush in flight.
  2. Work whose deadline passed is refused (``DeadlineExpired``) and not applied.
  3. Every mutation of the batch is applied to the core; the records of all of them are
     flushed in one transaction (group commit: the next batch is whatever queued meanwhile).
     Batches commit in order: N+1's flush starts only after N's has ended.
  4. Replies leave only after their own batch's flush commits; events are handed on after
     that. Each change is encoded once, before the flush: the ledger's outbox stores those
     bytes and the event sink sends the same ones.
  5. If a flush fails, its outcome is unknown: every partition it touched is dropped from
     memory and recovered from PostgreSQL in the background (fail-stop), and the waiting
     callers get ``FlushFailed``. They retry with the same idempotency key, which finds the
     durable answer or runs afresh. Batch N+1 was applied on top of N's memory, so its items
     in those partitions are refused too (``NotOwner(recovering)``: never sent, so not
     applied); its other partitions flush as usual.
  6. A partition fenced by another owner is dropped alone and the rest of its batch is
     flushed again without it. A partition the owner lost while a batch waited (dropped by a
     rebalance, or re-adopted) is refused for that batch: the callers are redirected.
  7. An exception out of the core is a bug or corruption in that partition alone: it is
     logged, the partition is fail-stopped (its memory may be half-changed), and every item
     of it in the batch, applied before the failure or not, gets ``NotOwner(recovering)``:
     none of its records is flushed, so nothing of them was applied.
Checkpoints are taken when memory equals what is durable (the loop waits for the flush in
flight first: one pipeline bubble per checkpoint) and written in the background, in bounded
transactions that the flush never waits for (persistence/store.py).

Every task the owner starts has an owner: the timer (expiries, stale feeds) lives in
``run``'s task group, and so does the flush in flight; checkpoint writers and recoveries
live in ``_Background``, which ``close`` cancels and awaits. Shutdown, in order: stop
taking RPCs, ``drain`` (what is queued is answered), cancel ``run``, ``checkpoint_now``
(the last checkpoint), ``close`` (refuse anything still queued, finish the checkpoint in
flight, cancel and await recoveries).

What each refusal tells the caller (the service maps them to statuses):
  NotOwner, Overloaded, DeadlineExpired   not applied: retry (elsewhere, later, afresh)
  FlushFailed                             outcome unknown: retry with the same key
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

import structlog
from opentelemetry.trace import SpanContext

from inventory_core import (
    AvailabilityChanged,
    CheckpointDelta,
    ClientCommand,
    Expire,
    HotKeyPart,
    InventoryKey,
    LocationHealth,
    Outcome,
    OverCommitted,
    Partition,
    ProcessUsage,
    Record,
    Reservation,
    Step,
    StockLevel,
    work_units,
)

from ..common import tracing

log = structlog.get_logger(__name__)

T = TypeVar("T")


# ------------------------------------------------------------------------------ answers


class NotOwner(Exception):
    """This process does not own (or is recovering) the partition: nothing was applied;
    retry, maybe elsewhere."""

    def __init__(self, partition: int, recovering: bool) -> None:
        state = "recovering" if recovering else "not owned here"
        super().__init__(f"partition {partition} is {state}")
        self.partition = partition
        self.recovering = recovering


class Overloaded(Exception):
    """The request queue is full: load is shed rather than buffered; nothing was applied."""


class DeadlineExpired(Exception):
    """The caller's deadline passed before the work was applied; nothing was applied."""


class FlushFailed(Exception):
    """The batch holding this request did not become durable, or its fate is unknown."""


# ------------------------------------------------------------------------------- seams


class Store(Protocol):
    """What the owner needs from persistence (persistence.store.PartitionStore)."""

    async def flush(
        self,
        records: Sequence[Record],
        epochs: dict[int, int],
        flushed_heads: dict[int, int],
        events: Sequence[AvailabilityChanged] = (),
        payloads: Sequence[bytes] = (),
    ) -> Sequence[int]:
        """Append a batch in one transaction, with its changes (``events``, encoded as
        ``payloads``). Returns the partitions another owner took (the epoch check failed):
        then nothing of the batch was written. Raises when the outcome is unknown."""
        ...

    def encode_changes(
        self, events: Sequence[AvailabilityChanged], committed_at_ms: int
    ) -> list[bytes]:
        """Each change as the ledger's outbox stores it and the event sink sends it."""
        ...

    async def write_checkpoint(
        self,
        deltas: Sequence[CheckpointDelta],
        epochs: dict[int, int],
        rows_per_transaction: int,
    ) -> None:
        """Write the deltas in transactions of at most ``rows_per_transaction`` rows that
        hold no lock the flush needs; they become visible together at the end."""
        ...

    async def load(self, partitions: Sequence[int]) -> dict[int, Partition]: ...

    async def epochs(self, partitions: Sequence[int]) -> dict[int, int]: ...


class EventSink(Protocol):
    def publish(
        self,
        events: Sequence[AvailabilityChanged],
        payloads: Sequence[bytes],
        committed_at_ms: int,
    ) -> None:
        """A committed batch's changes, with the encodings its ledger rows hold."""
        ...


class NoEvents:
    def publish(
        self,
        events: Sequence[AvailabilityChanged],
        payloads: Sequence[bytes],
        committed_at_ms: int,
    ) -> None:
        return None


@dataclass(frozen=True, slots=True)
class OwnerLimits:
    """Every bound of the loop; each must be positive (0 would mean unbounded to asyncio)."""

    # Requests waiting for the loop. At ~20k requests/s per process, 10,000 is half a second
    # of work: beyond that, answering RESOURCE_EXHAUSTED beats queueing past deadlines.
    request_queue_max: int = 10_000
    # Work per batch (one flush), in units of a one-line request: a feed's batch counts
    # each of its events (inventory_core.work_units), which cost the core about what a
    # one-line reservation does (~10 µs). Bounds a transaction to a few MiB and the time one
    # batch holds the loop to some tens of milliseconds of core work: counted in requests,
    # 2,000 feed batches of 500 events held it for seconds.
    flush_batch_units_max: int = 2_000
    # The timer's period: expired units return to sale, and a location whose feeds fell
    # silent is marked stale (inventory_core's on_timer), within about this long.
    timer_tick_s: float = 0.2
    # A location none of whose feeds is heard from for this long is marked stale.
    feed_stale_after_s: float = 300.0
    # Checkpoint when this many records were flushed since the last one, or this long passed:
    # bounds the ledger tail replayed at recovery (20,000 records: under a second). A
    # checkpoint costs rows for every key changed since the last (keys changed again in the
    # meantime are written once), and its delta is taken on the loop at about 0.3 µs a row
    # (three rows a reservation): 20,000 records hold the loop ~20 ms; 50,000 held it
    # 100-400 ms at 1,000,000 keys.
    checkpoint_records_max: int = 20_000
    checkpoint_interval_s: float = 30.0
    # Rows (keys, reservations, idempotency entries) per checkpoint transaction, encoded in
    # a worker thread: bounds a transaction, and the time the GIL is away from the loop.
    checkpoint_transaction_rows_max: int = 1_000
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


# ------------------------------------------------------------------------- work items


def _new_future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


# Called once with the answer or the refusal, on the loop, by the owner: it must not raise.
Done = Callable[[T | Exception], None]


@dataclass(slots=True, kw_only=True)
class _Work(Generic[T]):
    """One queued request. Its answer of type T (or the refusal) goes to its future, or to
    its ``done`` callback (the Batch path: no future and no task per item)."""

    partition: int
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[T] | None = None
    done: Done[T] | None = None
    # The sampled span of the call that waits for it: its flush's parent or link (tracing).
    trace: SpanContext | None = None


@dataclass(slots=True, kw_only=True)
class _Mutate(_Work[Outcome]):
    command: ClientCommand


@dataclass(slots=True, kw_only=True)
class _TimerTick(_Work[Outcome]):
    """The timer's (expiries, stale locations): nobody awaits it, so it is never refused
    with an exception."""

    silent_ms: int  # the silence that makes a location stale


@dataclass(slots=True, kw_only=True)
class _ReadLevels(_Work[tuple[StockLevel, ...]]):
    keys: tuple[InventoryKey, ...]


@dataclass(slots=True, kw_only=True)
class _ReadReservation(_Work[Reservation | None]):
    merchant_id: str
    reservation_id: str


@dataclass(slots=True, kw_only=True)
class _Query(_Work[Any]):
    """A read of the partition's state by the core's own function (``query(core, now_ms)``)."""

    name: str
    query: Callable[[Partition, int], Any]


_Item = _Mutate | _TimerTick | _ReadLevels | _ReadReservation | _Query
_Write = _Mutate | _TimerTick
_Read = _ReadLevels | _ReadReservation | _Query
# What a batch applied, per partition: each write with its step, in order.
_Writes = dict[int, list[tuple[_Write, Step]]]


@dataclass(slots=True)
class _Batch:
    """One batch of the loop: its writes on their way to durability, and the answers
    computed on state that the flush before it had not yet committed."""

    size: int  # queue items taken: all are answered when the batch is
    writes: _Writes = field(default_factory=dict)
    # The owned entry each partition's writes were applied to.
    owners: dict[int, _Owned] = field(default_factory=dict)
    # Reads of partitions the flush in flight touches: answered after it commits.
    held: list[tuple[_Read, Any]] = field(default_factory=list)
    # Partitions this batch's flush dropped (failed or fenced): the next batch's are refused.
    lost: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None

    @property
    def touched(self) -> set[int]:
        return set(self.writes)

    @property
    def settled(self) -> bool:
        return self.task is None or self.task.done()

    def serve(self, owned: _Owned, work: _Item, now_ms: int, held: bool) -> None:
        """One item against the core: a read is answered now (or held), a write joins."""
        core = owned.core
        match work:
            case _ReadLevels():
                self._answer(work, core.levels(work.keys, now_ms), held)
            case _ReadReservation():
                found = core.reservation(work.merchant_id, work.reservation_id, now_ms)
                self._answer(work, found, held)
            case _Query():
                self._answer(work, work.query(core, now_ms), held)
            case _Mutate():
                self._join(owned, work, core.apply(replace(work.command, now_ms=now_ms)))
            case _TimerTick():
                self._join(owned, work, core.on_timer(now_ms, work.silent_ms))

    def _answer(self, work: _Read, value: Any, held: bool) -> None:
        if held:
            self.held.append((work, value))
        else:
            _reply(work, value)

    def _join(self, owned: _Owned, work: _Write, step: Step) -> None:
        self.writes.setdefault(work.partition, []).append((work, step))
        self.owners[work.partition] = owned


class WallClock:
    """Unix epoch ms that never goes backwards within the process."""

    def __init__(self) -> None:
        self._last_ms = 0

    def now_ms(self) -> int:
        self._last_ms = max(self._last_ms, int(time.time() * 1000))
        return self._last_ms


class _Background:
    """The owner's tasks outside its loop (checkpoint writers, recoveries): none is lost.

    A task that ends with an exception is logged (each catches its expected failures, so
    that is a bug); ``cancel_all`` cancels every task and awaits it.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert not self.closed, f"{name} started after close()"
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("owner_task_failed", task=task.get_name(), exc_info=task.exception())

    async def cancel_all(self) -> None:
        self.closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


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
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(self.limits.request_queue_max)
        self._owned: dict[int, _Owned] = {}
        # Partitions being reloaded after a failed flush, with the epoch we held.
        self._recovering: dict[int, int] = {}
        self._background = _Background()
        self._checkpointing: asyncio.Task[None] | None = None
        # The batch whose flush is in flight (or ended and not yet settled by the loop), and
        # the one applied after it, waiting for it to end.
        self._in_flight: _Batch | None = None
        self._holding: _Batch | None = None
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
        self._silent_ms = round(self.limits.feed_stale_after_s * 1000)
        # Keys, live reservations and idempotency entries of every partition owned here,
        # against the per-process bounds (inventory_core.limits.process_*).
        self.usage = ProcessUsage()

    # -------------------------------------------------------------------------- the API

    async def mutate(
        self, partition: int, command: ClientCommand, deadline: float | None
    ) -> Outcome:
        future: asyncio.Future[Outcome] = _new_future()
        trace = tracing.sampled_call()
        self._submit(
            _Mutate(
                partition=partition, deadline=deadline, command=command, future=future, trace=trace
            )
        )
        return await future

    def submit_mutation(
        self, partition: int, command: ClientCommand, deadline: float | None, done: Done[Outcome]
    ) -> None:
        """``mutate`` by callback: ``done`` gets the outcome or the refusal (NotOwner,
        DeadlineExpired, FlushFailed) once. Raises NotOwner or Overloaded at once instead."""
        self._submit(_Mutate(partition=partition, deadline=deadline, command=command, done=done))

    async def levels(
        self, partition: int, keys: tuple[InventoryKey, ...], deadline: float | None
    ) -> tuple[StockLevel, ...]:
        future: asyncio.Future[tuple[StockLevel, ...]] = _new_future()
        self._submit(_ReadLevels(partition=partition, deadline=deadline, keys=keys, future=future))
        return await future

    async def reservation(
        self, partition: int, merchant_id: str, reservation_id: str, deadline: float | None
    ) -> Reservation | None:
        future: asyncio.Future[Reservation | None] = _new_future()
        work = _ReadReservation(
            partition=partition,
            deadline=deadline,
            merchant_id=merchant_id,
            reservation_id=reservation_id,
            future=future,
        )
        self._submit(work)
        return await future

    async def over_committed(
        self, partition: int, merchant_id: str, location_ids: Sequence[str], deadline: float | None
    ) -> tuple[OverCommitted, ...]:
        """The merchant's over-committed keys at these locations of the partition."""
        locations = tuple(location_ids)

        def query(core: Partition, now_ms: int) -> tuple[OverCommitted, ...]:
            return core.over_committed_at(merchant_id, locations)

        found: tuple[OverCommitted, ...] = await self._query(
            partition, "over_committed", query, deadline
        )
        return found

    async def feed_health(
        self, partition: int, merchant_id: str, location_ids: Sequence[str], deadline: float | None
    ) -> tuple[LocationHealth, ...]:
        """The feeds' health at these locations of the partition, as of now."""
        locations = tuple(location_ids)

        def query(core: Partition, now_ms: int) -> tuple[LocationHealth, ...]:
            return core.feed_health(merchant_id, locations, now_ms)

        found: tuple[LocationHealth, ...] = await self._query(
            partition, "feed_health", query, deadline
        )
        return found

    async def hot_key_parts(
        self, partition: int, keys: Sequence[InventoryKey] | None, deadline: float | None
    ) -> tuple[HotKeyPart, ...]:
        """The hot keys' parts among ``keys`` in the partition (None: every split home)."""
        asked = None if keys is None else tuple(keys)

        def query(core: Partition, now_ms: int) -> tuple[HotKeyPart, ...]:
            return core.hot_key_parts(core.split_keys if asked is None else asked, now_ms)

        found: tuple[HotKeyPart, ...] = await self._query(partition, "hot_keys", query, deadline)
        return found

    def partitions_with_splits(self) -> list[int]:
        """The owned partitions that are the home of a split key (read in passing: which to
        ask, not what they hold)."""
        return sorted(p for p, owned in self._owned.items() if owned.core.split_count)

    async def _query(
        self,
        partition: int,
        name: str,
        query: Callable[[Partition, int], Any],
        deadline: float | None,
    ) -> Any:
        future: asyncio.Future[Any] = _new_future()
        self._submit(
            _Query(partition=partition, deadline=deadline, name=name, query=query, future=future)
        )
        return await future

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
            self.drop([partition])  # a partition adopted again replaces the old memory
            core.attach(self.usage)
            self._owned[partition] = _Owned(core, epochs[partition], core.head_lsn)
            self._recovering.pop(partition, None)

    def drop(self, partitions: Sequence[int]) -> None:
        for partition in partitions:
            owned = self._owned.pop(partition, None)
            if owned is not None:
                owned.core.detach()
            self._dirty.discard(partition)

    # -------------------------------------------------------------------------- running

    async def run(self) -> None:
        """The loop, its flush in flight and its expiry timer; runs until cancelled.
        ``close()`` follows it."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._timer())
            while True:
                if self._checkpoint_due():
                    await self._settle()  # memory == durable: the checkpoint's moment
                    self._start_checkpoint()
                items = await self._take_batch()
                if not items:
                    continue  # a checkpoint fell due while idle
                self._holding = self._apply(items)
                try:
                    lost = await self._settle()  # batch N commits (or fails) before N+1
                except asyncio.CancelledError:
                    self._abandon(self._holding)
                    raise
                batch, self._holding = self._holding, None
                self._start_flush(batch, lost, group)

    async def close(self) -> None:
        """Stop, after ``run`` ended: refuse what is still queued (it was not applied),
        finish the checkpoint in flight, then cancel and await recoveries. Idempotent."""
        self._background.closed = True
        while not self._queue.empty():
            work = self._queue.get_nowait()
            _refuse(work, NotOwner(work.partition, recovering=False))
            self._queue.task_done()
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])
        await self._background.cancel_all()

    # ------------------------------------------------------------------------- the loop

    def _submit(self, work: _Item) -> None:
        """Queue the work (its future gets the answer) or refuse it at once."""
        if work.partition not in self._owned or self._background.closed:
            raise NotOwner(work.partition, work.partition in self._recovering)
        try:
            self._queue.put_nowait(work)
        except asyncio.QueueFull:
            self.stats.shed += 1
            raise Overloaded(f"request queue full ({self.limits.request_queue_max})") from None

    async def _take_batch(self) -> list[_Item]:
        """What is queued (at least one item), or nothing once a checkpoint is due."""
        # A checkpoint may fall due while we wait: wake for it. (One already due was started
        # at the top of the loop; the flush in flight starts one itself when it ends due
        # while the loop waits here.)
        due_in = self._last_checkpoint + self.limits.checkpoint_interval_s - time.monotonic()
        may_fall_due = (self._dirty or self._in_flight is not None) and due_in > 0
        if may_fall_due and self._checkpointing is None and self._queue.empty():
            try:
                batch = [await asyncio.wait_for(self._queue.get(), due_in)]
            except TimeoutError:
                return []
        else:
            batch = [await self._queue.get()]
        units = _units(batch[0])
        while units < self.limits.flush_batch_units_max and not self._queue.empty():
            work = self._queue.get_nowait()
            batch.append(work)
            units += _units(work)
        return batch

    def _apply(self, items: list[_Item]) -> _Batch:
        """Rules 1, 2 and 7: serve every item against the core; writes join the batch."""
        now_ms, now = self._now_ms(), time.monotonic()
        batch = _Batch(len(items))
        lease_lapsed = now > self.lease_valid_until
        in_flight = self._in_flight
        unsettled = in_flight.touched if in_flight and not in_flight.settled else set()
        for work in items:
            if isinstance(work, _TimerTick):
                self._ticks_queued.discard(work.partition)
        for work in sorted(items, key=_reads_first):
            owned = None if lease_lapsed else self._owned.get(work.partition)
            if owned is None:
                _refuse(work, NotOwner(work.partition, work.partition in self._recovering))
            elif work.deadline is not None and work.deadline <= now:
                _refuse(work, DeadlineExpired())
            else:
                try:
                    batch.serve(owned, work, now_ms, held=work.partition in unsettled)
                except Exception:  # a bug or corruption: this partition stops, alone
                    self._core_failed(work, batch.writes.pop(work.partition, []))
        return batch

    async def _settle(self) -> set[int]:
        """Wait for the flush in flight to end; the partitions it lost (failed, fenced)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return set()
        if in_flight.task is not None:
            await in_flight.task
        return in_flight.lost

    def _start_flush(self, batch: _Batch, lost: set[int], group: asyncio.TaskGroup) -> None:
        """Rules 1, 5 and 6 for what waited on the previous flush, then this batch's flush."""
        for read, value in batch.held:
            if read.partition in lost:
                _refuse(read, NotOwner(read.partition, recovering=True))
            else:
                _reply(read, value)
        for partition in list(batch.writes):
            if self._owned.get(partition) is not batch.owners[partition]:
                # Lost by the previous flush (its memory is gone, with this batch's changes)
                # or dropped by a rebalance meanwhile: nothing of it was sent.
                refusal = NotOwner(partition, partition in self._recovering or partition in lost)
                for work, _ in batch.writes.pop(partition):
                    _refuse(work, refusal)
            elif not any(step.records for _, step in batch.writes[partition]):
                for work, step in batch.writes.pop(partition):  # the previous flush committed
                    _reply(work, step.outcome)
        if not batch.writes:
            self._answered(batch)
            return
        self._in_flight = batch
        batch.task = group.create_task(self._flush(batch), name="flush")

    async def _flush(self, batch: _Batch) -> None:
        """Flush the batch's records, then reply. A partition fenced by another owner is
        dropped alone (its callers are redirected: nothing was written) and the rest of the
        batch is flushed again without it (DESIGN section 5.5)."""
        writes = batch.writes
        events = [event for ws in writes.values() for _, step in ws for event in step.events]
        # Encoded once: the ledger's outbox stores these bytes and the event sink sends them.
        committed_at_ms = self._now_ms()
        payloads = self._store.encode_changes(events, committed_at_ms)
        flushed = False
        try:
            while writes:
                touched = sorted(writes)
                steps = [
                    step for partition_writes in writes.values() for _, step in partition_writes
                ]
                records = [record for step in steps for record in step.records]
                epochs = {p: batch.owners[p].epoch for p in touched}
                flushed_heads = {p: batch.owners[p].flushed_lsn for p in touched}
                started = time.monotonic()
                traced = (work.trace for ws in writes.values() for work, _ in ws)
                try:
                    with tracing.flush_span(traced, len(records), len(touched)):
                        fenced = await self._store.flush(
                            records, epochs, flushed_heads, events, payloads
                        )
                except asyncio.CancelledError:  # stopping mid-flush: memory is ahead, drop it
                    self.drop(touched)
                    batch.lost.update(touched)
                    _refuse_all(writes, FlushFailed("the owner stopped during the flush"))
                    raise
                except Exception as error:  # unknown outcome: fail-stop these partitions
                    log.error(
                        "flush_failed", partitions=touched, records=len(records), error=repr(error)
                    )
                    self.stats.flush_failures += 1
                    self._fail_stop(touched)
                    batch.lost.update(touched)
                    _refuse_all(writes, FlushFailed(f"flush failed: {error!r}"))
                    return
                if not fenced:
                    self.stats.observe_flush(len(records), time.monotonic() - started)
                    self._flushed(batch, records)
                    flushed = True
                    break
                log.warning("flush_fenced", partitions=sorted(fenced))
                self.stats.fenced += len(fenced)
                # Recovery checks the epoch: another owner's partition is given up, one whose
                # head moved under the same epoch is reloaded.
                self._fail_stop(sorted(fenced))
                batch.lost.update(fenced)
                for partition in fenced:
                    for work, _ in writes.pop(partition, []):
                        _refuse(work, NotOwner(partition, recovering=True))
                kept = [i for i, event in enumerate(events) if event.partition in writes]
                events, payloads = [events[i] for i in kept], [payloads[i] for i in kept]
            _reply_all(writes)
            if flushed and events:  # after the replies (rule 4)
                self._events.publish(events, payloads, committed_at_ms)
            if self._holding is None and self._checkpoint_due():
                self._start_checkpoint()  # the loop is idle: memory == durable now
        finally:
            self._answered(batch)

    def _flushed(self, batch: _Batch, records: list[Record]) -> None:
        for record in records:  # the last lsn flushed per partition (the core may be ahead)
            batch.owners[record.partition].flushed_lsn = record.lsn
            if isinstance(record.command, Expire):
                self.stats.expired += len(record.command.reservation_ids)
        for partition, owned in batch.owners.items():
            if self._owned.get(partition) is owned:  # not dropped during the flush
                self._dirty.add(partition)
        self._records_since_checkpoint += len(records)

    def _abandon(self, batch: _Batch) -> None:
        """The loop stopped with a batch applied but never sent: its memory is dropped and
        its callers refused (not applied)."""
        for read, _ in batch.held:
            _refuse(read, NotOwner(read.partition, recovering=False))
        self.drop(sorted(batch.writes))
        for partition, partition_writes in batch.writes.items():
            for work, _ in partition_writes:
                _refuse(work, NotOwner(partition, recovering=False))
        self._answered(batch)

    def _answered(self, batch: _Batch) -> None:
        for _ in range(batch.size):
            self._queue.task_done()

    def _core_failed(self, work: _Item, applied_before: list[tuple[_Write, Step]]) -> None:
        """Rule 7: the partition's earlier items in the batch are dropped with its memory."""
        log.error("core_failed", partition=work.partition, kind=_kind(work), exc_info=True)
        self.stats.core_failures += 1
        self._fail_stop([work.partition])
        refusal = NotOwner(work.partition, recovering=True)
        _refuse(work, refusal)
        for earlier, _ in applied_before:
            _refuse(earlier, refusal)

    # ---------------------------------------------------------------- timer and recovery

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(self.limits.timer_tick_s)
            now_ms = self._now_ms()
            for partition, owned in list(self._owned.items()):
                try:
                    due = owned.core.next_timer_ms(self._silent_ms)
                except Exception:  # the tick's on_timer will fail-stop it, in the loop
                    log.error(
                        "core_failed", partition=partition, kind="next_timer_ms", exc_info=True
                    )
                    due = now_ms
                if due is None or due > now_ms or partition in self._ticks_queued:
                    continue
                if self._queue.full():
                    break  # any command expires what is due first; the next tick retries
                self._ticks_queued.add(partition)  # at most one tick per partition queued
                self._queue.put_nowait(
                    _TimerTick(partition=partition, deadline=None, silent_ms=self._silent_ms)
                )

    def _fail_stop(self, partitions: list[int]) -> None:
        for partition in partitions:
            owned = self._owned.get(partition)
            if owned is not None:  # not dropped meanwhile
                self._recovering[partition] = owned.epoch
        self.drop(partitions)
        if not self._background.closed:
            self._background.spawn(self._recover(partitions), f"recover {partitions}")

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

    def _checkpoint_due(self) -> bool:
        due = (
            self._records_since_checkpoint >= self.limits.checkpoint_records_max
            or time.monotonic() - self._last_checkpoint >= self.limits.checkpoint_interval_s
        )
        # After close() nothing starts.
        return (
            due
            and bool(self._dirty)
            and self._checkpointing is None
            and not self._background.closed
        )

    def _start_checkpoint(self) -> None:
        """Take the deltas now (memory == durable: no flush in flight, nothing unflushed) and
        write them in the background."""
        deltas = [self._owned[p].core.take_checkpoint() for p in sorted(self._dirty)]
        epochs = {d.partition: self._owned[d.partition].epoch for d in deltas}
        self._dirty.clear()
        self._records_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpointing = self._background.spawn(
            self._write_checkpoint(deltas, epochs), "checkpoint"
        )

    async def _write_checkpoint(
        self, deltas: list[CheckpointDelta], epochs: dict[int, int]
    ) -> None:
        """Write the deltas; the store cuts them into transactions of bounded rows, so the
        encoding of a million-row checkpoint never holds the loop (and every reply) for long.
        A checkpoint not written (a failure, or cancellation at close) makes the next one of
        its partitions full: a lost delta must never be skipped over."""
        try:
            await self._store.write_checkpoint(
                deltas, epochs, self.limits.checkpoint_transaction_rows_max
            )
            self.stats.checkpoints += 1
            deltas = []
        except Exception as error:
            log.warning("checkpoint_failed", partitions=len(deltas), error=repr(error))
        finally:
            for delta in deltas:
                owned = self._owned.get(delta.partition)
                if owned is not None:
                    owned.core.checkpoint_failed()
                    self._dirty.add(delta.partition)
            self._checkpointing = None

    async def checkpoint_now(self) -> None:
        """Write a checkpoint of everything dirty (at shutdown, after ``run``, and for tests:
        no flush is in flight then)."""
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])
        self._records_since_checkpoint = self.limits.checkpoint_records_max
        if self._checkpoint_due():
            self._start_checkpoint()
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])

    async def drain(self) -> None:
        """Wait until every queued request has been answered (its flush included)."""
        await self._queue.join()

    def gauges(self) -> dict[str, int]:
        """Point-in-time figures for the periodic stats log and health views."""
        cores = [owned.core for owned in self._owned.values()]
        return {
            "queue_depth": self._queue.qsize(),
            "partitions_owned": len(cores),
            "partitions_recovering": len(self._recovering),
            # The process totals, counted as they change (against limits.process_*).
            "keys": self.usage.keys,
            "live_reservations": self.usage.reservations_live,
            "idempotency_entries": self.usage.idempotency_entries,
            "feed_facts": self.usage.feed_facts,
            "over_committed_keys": sum(core.over_committed_count for core in cores),
            "stale_locations": sum(core.stale_location_count for core in cores),
        }

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def over_committed_units(self) -> int:
        """Units promised beyond what there is (-available of every over-committed key):
        from the cores' indexes, so as cheap as there are such keys (normally none)."""
        return sum(sum(owned.core.over_committed().values()) for owned in self._owned.values())


@dataclass(slots=True)
class OwnerStats:
    flushes: int = 0
    records_flushed: int = 0
    flush_seconds_total: float = 0.0
    flush_failures: int = 0
    # Exceptions out of the core (each fail-stopped its partition): any is a bug.
    core_failures: int = 0
    # Partitions dropped because a flush found another owner's epoch (fenced).
    fenced: int = 0
    checkpoints: int = 0
    shed: int = 0

    # The slowest flush since the stats line last reset it: tail latency shows here first.
    flush_seconds_max: float = 0.0
    # Reservations expired, counted when their Expire records are flushed.
    expired: int = 0
    # Told of every flush (records, seconds): the metrics' histograms (common/metrics.py).
    on_flush: Callable[[int, float], None] | None = None

    def observe_flush(self, records: int, seconds: float) -> None:
        self.flushes += 1
        self.records_flushed += records
        self.flush_seconds_total += seconds
        self.flush_seconds_max = max(self.flush_seconds_max, seconds)
        if self.on_flush is not None:
            self.on_flush(records, seconds)


def _kind(work: _Item) -> str:
    match work:
        case _Mutate():
            return type(work.command).__name__
        case _TimerTick():
            return "Timer"
        case _ReadLevels():
            return "levels"
        case _ReadReservation():
            return "reservation"
        case _Query():
            return work.name


def _units(work: _Item) -> int:
    return work_units(work.command) if isinstance(work, _Mutate) else 1


def _reads_first(work: _Item) -> int:
    return 0 if isinstance(work, _ReadLevels | _ReadReservation | _Query) else 1


def _reply(work: _Work[T], value: T) -> None:
    _deliver(work, value, None)


def _refuse(work: _Item, error: Exception) -> None:
    _deliver(work, None, error)


def _deliver(work: _Work[Any], value: Any, error: Exception | None) -> None:
    """The answer (or the refusal) to whoever waits for it, once; an expiry tick has none."""
    done, work.done = work.done, None
    if done is not None:
        try:
            done(value if error is None else error)
        except Exception:  # the callback's bug must not stop the loop or the other answers
            log.exception("answer_callback_failed", partition=work.partition)
    elif work.future is not None and not work.future.done():  # the caller may have gone
        if error is None:
            work.future.set_result(value)
        else:
            work.future.set_exception(error)


def _reply_all(writes: _Writes) -> None:
    for partition_writes in writes.values():
        for work, step in partition_writes:
            _reply(work, step.outcome)


def _refuse_all(writes: _Writes, error: Exception) -> None:
    for partition_writes in writes.values():
        for work, _ in partition_writes:
            _refuse(work, error)
