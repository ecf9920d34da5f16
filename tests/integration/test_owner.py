"""The owner loop (shard_router.shard.owner) against an in-memory store: no PostgreSQL.

The fake store keeps what it "durably" has as a list of records per partition, checks the
epoch and flushed head as PartitionStore does, and can block (asyncio.Event) or fail on
demand: before the commit (nothing kept) or after it (kept, as a database whose reply was
lost). ``load`` rebuilds a partition by replaying what it has. tests/integration/
test_outcomes.py serves the same store through the gRPC service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
import structlog
from structlog.testing import capture_logs

from inventory_core import (
    AvailabilityChanged,
    CapacityExhausted,
    CheckpointDelta,
    Command,
    Expire,
    FeedEvent,
    FeedEventKind,
    Ingest,
    InventoryKey,
    Line,
    Outcome,
    Partition,
    Record,
    ReservationState,
    Reserve,
    Reserved,
    SetStock,
    Step,
    StockChanged,
    partition_of,
)
from persistence.store import FencedOut
from shard_router.shard import owner as owner_module
from shard_router.shard.owner import (
    DeadlineExpired,
    FlushFailed,
    NotOwner,
    Overloaded,
    Owner,
    OwnerLimits,
)

T0_MS = 1_700_000_000_000
APPLE = InventoryKey("m1", "apple", "loc-3")
PEAR = InventoryKey("m1", "pear", "loc-3")
FIG = InventoryKey("m1", "fig", "loc-5")
WAIT_S = 5.0


class StoreDown(Exception):
    """The fake database is unreachable."""


@dataclass
class FakeStore:
    """An in-memory Store: records per partition, epochs, and switches to block or fail."""

    epoch: dict[int, int] = field(default_factory=dict)
    durable: dict[int, list[Record]] = field(default_factory=dict)
    flush_calls: list[list[Record]] = field(default_factory=list)
    checkpoints: list[list[CheckpointDelta]] = field(default_factory=list)
    flush_gate: asyncio.Event | None = None
    load_gate: asyncio.Event | None = None
    checkpoint_gate: asyncio.Event | None = None
    checkpoint_calls: int = 0
    rows_per_transaction: list[int] = field(default_factory=list)
    fail_flushes: int = 0
    # Flushes that commit (the records are kept) and then raise: the reply was lost.
    fail_flushes_after_commit: int = 0
    fail_loads: int = 0
    fail_checkpoints: int = 0
    loads: list[list[int]] = field(default_factory=list)
    # The change encodings of every committed flush, in order (the ledger's outbox).
    outbox: list[bytes] = field(default_factory=list)
    encoded: int = 0  # changes encoded, by every encode_changes call

    def encode_changes(
        self, events: Sequence[AvailabilityChanged], committed_at_ms: int
    ) -> list[bytes]:
        self.encoded += len(events)
        return [payload_of(event) for event in events]

    def own(self, *partitions: int) -> None:
        for partition in partitions:
            self.epoch[partition] = self.epoch.get(partition, 0) + 1
            self.durable.setdefault(partition, [])

    async def flush(
        self,
        records: Sequence[Record],
        epochs: dict[int, int],
        flushed_heads: dict[int, int],
        events: Sequence[AvailabilityChanged] = (),
        payloads: Sequence[bytes] = (),
    ) -> tuple[int, ...]:
        assert [payload_of(e) for e in events] == list(payloads), "changes and their encodings"
        self.flush_calls.append(list(records))
        if self.flush_gate is not None:
            await self.flush_gate.wait()
        if self.fail_flushes:
            self.fail_flushes -= 1
            raise StoreDown("connection reset")
        lost = [
            p
            for p in {r.partition for r in records}
            if epochs[p] != self.epoch[p] or flushed_heads[p] != len(self.durable[p])
        ]
        if lost:  # the transaction rolls back: nothing of the batch is written
            return tuple(sorted(lost))
        for record in records:
            assert record.lsn == len(self.durable[record.partition]) + 1
            self.durable[record.partition].append(record)
        self.outbox.extend(payloads)
        if self.fail_flushes_after_commit:
            self.fail_flushes_after_commit -= 1
            raise StoreDown("connection reset after commit")
        return ()

    async def write_checkpoint(
        self, deltas: Sequence[CheckpointDelta], epochs: dict[int, int], rows_per_transaction: int
    ) -> None:
        self.checkpoint_calls += 1
        self.rows_per_transaction.append(rows_per_transaction)
        if self.checkpoint_gate is not None:
            await self.checkpoint_gate.wait()
        if self.fail_checkpoints:
            self.fail_checkpoints -= 1
            raise StoreDown("checkpoint lost")
        lost = [d.partition for d in deltas if epochs[d.partition] != self.epoch[d.partition]]
        if lost:
            raise FencedOut(lost)
        self.checkpoints.append(list(deltas))

    async def load(self, partitions: Sequence[int]) -> dict[int, Partition]:
        self.loads.append(list(partitions))
        if self.load_gate is not None:
            await self.load_gate.wait()
        if self.fail_loads:
            self.fail_loads -= 1
            raise StoreDown("still down")
        return {p: self.rebuild(p) for p in partitions}

    async def epochs(self, partitions: Sequence[int]) -> dict[int, int]:
        return {p: self.epoch[p] for p in partitions}

    def rebuild(self, partition: int) -> Partition:
        core = Partition(partition)
        for record in self.durable[partition]:
            core.replay(record)
        return core


@dataclass
class Clock:
    now_ms: int = T0_MS

    def __call__(self) -> int:
        return self.now_ms


def payload_of(event: AvailabilityChanged) -> bytes:
    """The fake store's encoding of a change: enough to tell changes apart."""
    return f"{event.partition}/{event.lsn}/{event.key.sku_id}/{event.after.version}".encode()


@dataclass
class Events:
    published: list[tuple[AvailabilityChanged, ...]] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    def publish(
        self,
        events: Sequence[AvailabilityChanged],
        payloads: Sequence[bytes],
        committed_at_ms: int,
    ) -> None:
        assert [payload_of(e) for e in events] == list(payloads), "changes and their encodings"
        self.published.append(tuple(events))
        self.payloads.extend(payloads)


@dataclass
class Rig:
    owner: Owner
    store: FakeStore
    clock: Clock
    events: Events
    loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self.loop_task is None
        self.loop_task = asyncio.create_task(self.owner.run())

    async def stop(self) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop_task
        await self.owner.close()

    def core(self, partition: int) -> Partition:
        return self.owner._owned[partition].core


@contextlib.asynccontextmanager
async def rig(
    limits: OwnerLimits | None = None, partitions: Sequence[int] = (3,), start: bool = True
) -> AsyncIterator[Rig]:
    store, clock, events = FakeStore(), Clock(), Events()
    store.own(*partitions)
    owner = Owner(store, events, limits or OwnerLimits(timer_tick_s=3600), clock)
    owner.adopt(await store.load(partitions), await store.epochs(partitions))
    store.loads.clear()
    running = Rig(owner, store, clock, events)
    if start:
        running.start()
    try:
        yield running
    finally:
        await running.stop()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), WAIT_S * 2))


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def settle() -> None:
    """Let every runnable task take its next step."""
    for _ in range(10):
        await asyncio.sleep(0)


def set_stock(key: InventoryKey, on_hand: int, idem: str) -> SetStock:
    return SetStock(key, idem, on_hand, None, 0)


def reserve(key: InventoryKey, quantity: int, idem: str, ttl_s: int = 60) -> Reserve:
    return Reserve(key.merchant_id, idem, (Line(key, quantity),), ttl_s, 0)


def mutate(r: Rig, partition: int, command: SetStock | Reserve | Ingest) -> asyncio.Task[Outcome]:
    return asyncio.create_task(r.owner.mutate(partition, command, None))


# -------------------------------------------------------------------- replies and reads


def test_reply_and_events_wait_for_the_flush_to_commit() -> None:
    async def body() -> None:
        async with rig() as r:
            r.store.flush_gate = asyncio.Event()
            pending = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            await until(lambda: len(r.store.flush_calls) == 1, "the flush to start")
            await settle()
            assert not pending.done()
            assert r.events.published == []
            r.store.flush_gate.set()
            outcome = await pending
            assert isinstance(outcome, StockChanged) and outcome.level.on_hand == 10
            assert [e.key for batch in r.events.published for e in batch] == [APPLE]
            assert [rec.lsn for rec in r.store.durable[3]] == [1]

    run(body)


def test_reads_of_a_batch_are_answered_before_its_writes_and_show_only_flushed_state() -> None:
    async def body() -> None:
        async with rig(start=False) as r:
            r.store.flush_gate = asyncio.Event()
            write = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            read = asyncio.create_task(r.owner.levels(3, (APPLE,), None))
            await settle()
            assert r.owner.queue_depth() == 2  # write queued before read, one batch
            r.start()
            await until(lambda: len(r.store.flush_calls) == 1, "the flush to start")
            level = (await read)[0]
            assert (level.exists, level.on_hand) == (False, 0)
            assert not write.done()

            # A read that arrives while the flush is in flight waits for it...
            later = asyncio.create_task(r.owner.levels(3, (APPLE,), None))
            await settle()
            assert not later.done()
            r.store.flush_gate.set()
            await write
            # ...and then shows the committed write.
            assert (await later)[0].on_hand == 10

    run(body)


def test_read_queued_behind_a_failing_flush_never_sees_its_state() -> None:
    async def body() -> None:
        async with rig() as r:
            r.store.flush_gate, r.store.fail_flushes = asyncio.Event(), 1
            r.store.load_gate = asyncio.Event()
            write = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            await until(lambda: len(r.store.flush_calls) == 1, "the flush to start")
            read = asyncio.create_task(r.owner.levels(3, (APPLE,), None))
            await settle()
            r.store.flush_gate.set()
            with pytest.raises(FlushFailed):
                await write
            with pytest.raises(NotOwner) as refused:
                await read
            assert refused.value.recovering
            r.store.load_gate.set()
            await until(lambda: r.owner.owns(3), "recovery")
            assert (await r.owner.levels(3, (APPLE,), None))[0].exists is False

    run(body)


# ------------------------------------------------------------------- failure and recovery


def test_failed_flush_fails_every_write_of_the_batch_then_partition_recovers() -> None:
    async def body() -> None:
        async with rig(partitions=(3, 5), start=False) as r:
            first = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            r.start()
            await first
            r.store.fail_flushes, r.store.load_gate = 1, asyncio.Event()
            r.store.flush_gate = asyncio.Event()
            doomed = [
                mutate(r, 3, set_stock(APPLE, 99, "s2")),
                mutate(r, 3, reserve(APPLE, 2, "r1")),
                mutate(r, 3, reserve(APPLE, 1000, "r-too-many")),  # rejected, same batch
            ]
            await until(lambda: len(r.store.flush_calls) == 2, "the failing flush")
            assert len(r.store.flush_calls[1]) == 2
            r.store.flush_gate.set()
            for task in doomed:
                with pytest.raises(FlushFailed):
                    await task
            assert r.owner.stats.flush_failures == 1

            # Dropped and recovering: refused as retryable until the load finishes.
            assert not r.owner.owns(3) and r.owner.owns(5)
            with pytest.raises(NotOwner) as refused:
                await r.owner.mutate(3, set_stock(APPLE, 5, "s3"), None)
            assert refused.value.recovering and refused.value.partition == 3
            # An untouched partition keeps serving meanwhile.
            assert isinstance(await r.owner.mutate(5, set_stock(FIG, 1, "f1"), None), StockChanged)

            r.store.load_gate.set()
            await until(lambda: r.owner.owns(3), "recovery")
            assert r.store.loads == [[3]]
            assert r.core(3).snapshot() == r.store.rebuild(3).snapshot()
            assert (await r.owner.levels(3, (APPLE,), None))[0].on_hand == 10
            # The client's retry with the same key runs afresh.
            again = await r.owner.mutate(3, set_stock(APPLE, 99, "s2"), None)
            assert isinstance(again, StockChanged) and again.level.on_hand == 99
            assert [rec.lsn for rec in r.store.durable[3]] == [1, 2]

    run(body)


def test_recovery_retries_a_failing_load_until_it_succeeds() -> None:
    async def body() -> None:
        limits = OwnerLimits(timer_tick_s=3600, recovery_backoff_s_max=0.01)
        async with rig(limits) as r:
            r.store.fail_flushes, r.store.fail_loads = 1, 3
            with pytest.raises(FlushFailed):
                await r.owner.mutate(3, set_stock(APPLE, 1, "s1"), None)
            await until(lambda: r.owner.owns(3), "recovery")
            assert len(r.store.loads) == 4
            assert isinstance(
                await r.owner.mutate(3, set_stock(APPLE, 1, "s1"), None), StockChanged
            )

    run(body)


def test_partition_taken_by_another_owner_during_recovery_is_not_readopted() -> None:
    async def body() -> None:
        async with rig() as r:
            r.store.flush_gate = asyncio.Event()
            pending = mutate(r, 3, set_stock(APPLE, 1, "s1"))
            await until(lambda: len(r.store.flush_calls) == 1, "the flush to start")
            r.store.own(3)  # someone else takes partition 3: our flush is fenced
            r.store.flush_gate.set()
            with pytest.raises(NotOwner):  # nothing was written: retryable, not unknown
                await pending
            await until(lambda: not r.owner._recovering, "recovery to give up")
            assert not r.owner.owns(3)
            with pytest.raises(NotOwner) as refused:
                await r.owner.mutate(3, set_stock(APPLE, 1, "s1"), None)
            assert not refused.value.recovering
            assert r.store.durable[3] == []

    run(body)


def test_a_fenced_partition_is_dropped_alone_and_the_rest_of_the_batch_is_flushed() -> None:
    async def body() -> None:
        async with rig(partitions=(3, 5), start=False) as r:
            r.store.flush_gate = asyncio.Event()
            fenced = mutate(r, 3, set_stock(APPLE, 1, "s1"))
            kept = mutate(r, 5, set_stock(APPLE, 2, "s2"))
            r.start()  # both queued first: one batch
            await until(lambda: len(r.store.flush_calls) == 1, "the flush to start")
            assert {rec.partition for rec in r.store.flush_calls[0]} == {3, 5}
            r.store.own(3)  # another owner takes partition 3 while the batch is in flight
            r.store.flush_gate.set()
            with pytest.raises(NotOwner):
                await fenced
            assert isinstance(await kept, StockChanged)
            # Flushed again without partition 3: only 5's record is durable.
            assert [rec.partition for rec in r.store.flush_calls[1]] == [5]
            assert r.store.durable[3] == [] and len(r.store.durable[5]) == 1
            assert r.owner.stats.fenced == 1
            await until(lambda: not r.owner._recovering, "recovery to give 3 up")
            assert not r.owner.owns(3) and r.owner.owns(5)

    run(body)


def test_process_usage_counts_owned_partitions_and_bounds_them() -> None:
    async def body() -> None:
        async with rig(partitions=(3, 5)) as r:
            await r.owner.mutate(3, set_stock(APPLE, 5, "s1"), None)
            await r.owner.mutate(5, set_stock(PEAR, 5, "s2"), None)
            await r.owner.mutate(5, reserve(PEAR, 1, "r1"), None)
            usage = r.owner.usage
            assert (usage.keys, usage.reservations_live, usage.idempotency_entries) == (2, 1, 3)
            usage.keys_max = 2
            refused = await r.owner.mutate(3, set_stock(FIG, 1, "s3"), None)
            assert refused == CapacityExhausted("process_keys_max", 2)
            r.owner.drop([5])  # a hand-off: its share leaves the totals
            assert (usage.keys, usage.reservations_live, usage.idempotency_entries) == (1, 0, 1)
            assert isinstance(await r.owner.mutate(3, set_stock(FIG, 1, "s4"), None), StockChanged)

    run(body)


# ------------------------------------------------------------------- a core exception


class CoreBroke(Exception):
    """What a bug in the core looks like to the owner."""


def break_core_on(monkeypatch: pytest.MonkeyPatch, idempotency_key: str) -> None:
    """Partition.apply raises for the command with this idempotency key, in any partition."""
    original = Partition.apply

    def apply(self: Partition, command: Command) -> Step:
        if getattr(command, "idempotency_key", None) == idempotency_key:
            raise CoreBroke(f"corrupt state on {idempotency_key}")
        return original(self, command)

    monkeypatch.setattr(Partition, "apply", apply)


def test_core_exception_fail_stops_its_partition_alone_and_refuses_its_items_retryably(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    break_core_on(monkeypatch, "boom")

    async def body() -> None:
        async with rig(partitions=(3, 5), start=False) as r:
            r.store.load_gate = asyncio.Event()
            # One batch: partition 3 applies s1, breaks on boom, then has s2 queued behind.
            before = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            read = asyncio.create_task(r.owner.levels(3, (APPLE,), None))
            other = mutate(r, 5, set_stock(FIG, 1, "f1"))
            broken = mutate(r, 3, reserve(APPLE, 1, "boom"))
            after = mutate(r, 3, set_stock(PEAR, 2, "s2"))
            await settle()
            assert r.owner.queue_depth() == 5
            with capture_logs() as logs:
                monkeypatch.setattr(owner_module, "log", structlog.get_logger())
                r.start()
                for task in (before, broken, after):
                    with pytest.raises(NotOwner) as refused:
                        await task
                    assert refused.value.recovering and refused.value.partition == 3
                outcome = await other
            # The read came first and saw only durable state; the other partition flushed.
            assert (await read)[0].exists is False
            assert isinstance(outcome, StockChanged)
            assert [[(rec.partition, rec.lsn) for rec in call] for call in r.store.flush_calls] == [
                [(5, 1)]
            ]
            assert r.store.durable[3] == []
            assert r.owner.stats.core_failures == 1
            (failure,) = [entry for entry in logs if entry["event"] == "core_failed"]
            assert failure["log_level"] == "error"
            assert (failure["partition"], failure["kind"], failure["exc_info"]) == (
                3,
                "Reserve",
                True,
            )

            # The process goes on: 3 recovers from the store, 5 never stopped serving.
            assert r.loop_task is not None and not r.loop_task.done()
            assert not r.owner.owns(3) and r.owner.recovering_partitions == [3]
            assert isinstance(await r.owner.mutate(5, set_stock(FIG, 2, "f2"), None), StockChanged)
            r.store.load_gate.set()
            await until(lambda: r.owner.owns(3), "recovery")
            assert r.core(3).snapshot() == r.store.rebuild(3).snapshot()
            # Nothing of partition 3 was applied: the retries run afresh.
            again = await r.owner.mutate(3, set_stock(APPLE, 10, "s1"), None)
            assert isinstance(again, StockChanged) and again.level.on_hand == 10
            assert [rec.lsn for rec in r.store.durable[3]] == [1]

    run(body)


def test_core_exception_in_an_expiry_tick_fail_stops_the_partition_not_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def expire_due(self: Partition, now_ms: int) -> Step:
        raise CoreBroke("corrupt expiry heap")

    async def body() -> None:
        async with rig(OwnerLimits(timer_tick_s=0.005), partitions=(3, 5)) as r:
            await r.owner.mutate(3, set_stock(APPLE, 5, "s1"), None)
            reserved = await r.owner.mutate(3, reserve(APPLE, 2, "r1", ttl_s=30), None)
            assert isinstance(reserved, Reserved)
            r.store.load_gate = asyncio.Event()
            monkeypatch.setattr(Partition, "expire_due", expire_due)
            r.clock.now_ms = reserved.reservation.expires_at_ms
            await until(lambda: not r.owner.owns(3), "the partition to fail-stop")
            assert r.owner.stats.core_failures == 1
            assert isinstance(await r.owner.mutate(5, set_stock(FIG, 1, "f1"), None), StockChanged)
            monkeypatch.undo()
            r.store.load_gate.set()
            await until(lambda: r.owner.owns(3), "recovery")
            await until(lambda: len(r.store.durable[3]) == 3, "the expiry record")
            assert isinstance(r.store.durable[3][2].command, Expire)

    run(body)


# ---------------------------------------------------------------------------- deadlines


def test_work_whose_deadline_passed_is_refused_and_not_applied() -> None:
    async def body() -> None:
        async with rig() as r:
            past = time.monotonic() - 0.001
            with pytest.raises(DeadlineExpired):
                await r.owner.mutate(3, set_stock(APPLE, 10, "s1"), past)
            with pytest.raises(DeadlineExpired):
                await r.owner.levels(3, (APPLE,), past)
            assert r.store.flush_calls == []
            assert r.core(3).head_lsn == 0
            # The same request with time left is applied.
            future = time.monotonic() + 60
            assert isinstance(
                await r.owner.mutate(3, set_stock(APPLE, 10, "s1"), future), StockChanged
            )

    run(body)


def test_deadline_that_passes_while_queued_is_refused() -> None:
    async def body() -> None:
        async with rig(start=False) as r:
            soon = time.monotonic() + 0.02
            pending = asyncio.create_task(r.owner.mutate(3, set_stock(APPLE, 10, "s1"), soon))
            await asyncio.sleep(0.05)
            r.start()
            with pytest.raises(DeadlineExpired):
                await pending
            assert r.core(3).head_lsn == 0

    run(body)


# ------------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("queue_max", [1, 3])
def test_submit_beyond_request_queue_max_is_shed_at_once(queue_max: int) -> None:
    async def body() -> None:
        limits = OwnerLimits(request_queue_max=queue_max, timer_tick_s=3600)
        async with rig(limits, start=False) as r:
            queued = [mutate(r, 3, set_stock(APPLE, i, f"s{i}")) for i in range(queue_max)]
            await settle()
            assert r.owner.queue_depth() == queue_max
            with pytest.raises(Overloaded):
                await r.owner.mutate(3, set_stock(APPLE, 7, "extra"), None)
            with pytest.raises(Overloaded):
                await r.owner.levels(3, (APPLE,), None)
            assert r.owner.stats.shed == 2
            r.start()
            outcomes = await asyncio.gather(*queued)
            assert all(isinstance(o, StockChanged) for o in outcomes)
            # Room again once the queue drained.
            assert isinstance(
                await r.owner.mutate(3, set_stock(APPLE, 7, "extra"), None), StockChanged
            )

    run(body)


@pytest.mark.parametrize(("batch_max", "requests"), [(1, 3), (4, 10), (5, 5)])
def test_flush_holds_at_most_flush_batch_units_max_requests(batch_max: int, requests: int) -> None:
    async def body() -> None:
        limits = OwnerLimits(flush_batch_units_max=batch_max, timer_tick_s=3600)
        async with rig(limits, start=False) as r:
            tasks = [mutate(r, 3, set_stock(APPLE, i + 1, f"s{i}")) for i in range(requests)]
            await settle()
            r.start()
            await asyncio.gather(*tasks)
            sizes = [len(call) for call in r.store.flush_calls]
            full, rest = divmod(requests, batch_max)
            assert sizes == [batch_max] * full + ([rest] if rest else [])
            assert r.owner.stats.records_flushed == requests

    run(body)


def test_a_feed_batch_counts_each_of_its_events_against_flush_batch_units_max() -> None:
    partition = partition_of(APPLE.merchant_id, APPLE.location_id)

    def feed(batch: int) -> Ingest:
        events = tuple(
            FeedEvent(f"b{batch}-{i}", FeedEventKind.RECEIPT, APPLE, T0_MS, quantity=1)
            for i in range(6)
        )
        return Ingest(APPLE.merchant_id, "pos", events, 0)

    async def body() -> None:
        limits = OwnerLimits(flush_batch_units_max=10, timer_tick_s=3600)
        async with rig(limits, partitions=(partition,), start=False) as r:
            tasks = [mutate(r, partition, feed(batch)) for batch in range(3)]
            await settle()
            r.start()
            await asyncio.gather(*tasks)
            # 6 + 6 units reach the bound of 10: the third batch waits for the next flush.
            assert [len(call) for call in r.store.flush_calls] == [2, 1]

    run(body)


def test_checkpoint_is_written_when_checkpoint_records_max_is_reached() -> None:
    async def body() -> None:
        limits = OwnerLimits(
            timer_tick_s=3600, checkpoint_records_max=3, checkpoint_interval_s=3600
        )
        async with rig(limits) as r:
            for i in range(2):
                await r.owner.mutate(3, set_stock(APPLE, i + 1, f"s{i}"), None)
            await settle()
            assert r.store.checkpoints == []
            await r.owner.mutate(3, set_stock(APPLE, 3, "s2"), None)
            await until(lambda: len(r.store.checkpoints) == 1, "the checkpoint")
            (delta,) = r.store.checkpoints[0]
            assert (delta.partition, delta.lsn) == (3, 3)
            assert r.owner.stats.checkpoints == 1

    run(body)


def test_checkpoint_of_every_dirty_partition_is_one_write_bounded_per_transaction() -> None:
    async def body() -> None:
        limits = OwnerLimits(
            timer_tick_s=3600,
            checkpoint_records_max=1_000_000,
            checkpoint_interval_s=3600,
            checkpoint_transaction_rows_max=4,
        )
        async with rig(limits, partitions=(3, 5, 7)) as r:
            for partition, fruits in ((3, (APPLE, FIG)), (5, (APPLE, FIG)), (7, (APPLE,))):
                for i, fruit in enumerate(fruits):
                    await r.owner.mutate(partition, set_stock(fruit, 1, f"s{partition}{i}"), None)
            await r.owner.checkpoint_now()
            # The store cuts it into transactions (tests/integration/test_checkpoint_store.py).
            (deltas,) = r.store.checkpoints
            assert [d.partition for d in deltas] == [3, 5, 7]
            assert r.store.rows_per_transaction == [4]
            assert r.owner.stats.checkpoints == 1

    run(body)


def test_checkpoint_is_written_when_checkpoint_interval_passes_even_when_idle() -> None:
    async def body() -> None:
        limits = OwnerLimits(
            timer_tick_s=3600, checkpoint_records_max=1_000_000, checkpoint_interval_s=0.2
        )
        async with rig(limits) as r:
            await r.owner.mutate(3, set_stock(APPLE, 1, "s1"), None)
            await until(lambda: len(r.store.checkpoints) == 1, "the checkpoint")
            assert r.store.checkpoints[0][0].lsn == 1
            await asyncio.sleep(0.3)  # nothing dirty since: no other checkpoint
            assert len(r.store.checkpoints) == 1

    run(body)


def test_failed_checkpoint_write_makes_the_next_one_full() -> None:
    async def body() -> None:
        limits = OwnerLimits(timer_tick_s=3600, checkpoint_records_max=1)
        async with rig(limits) as r:
            r.store.fail_checkpoints = 1
            await r.owner.mutate(3, set_stock(APPLE, 1, "s1"), None)
            await until(lambda: r.store.fail_checkpoints == 0, "the failed checkpoint")
            await settle()
            assert r.owner.stats.checkpoints == 0
            await r.owner.mutate(3, set_stock(PEAR, 2, "s2"), None)
            await until(lambda: len(r.store.checkpoints) == 1, "the next checkpoint")
            (delta,) = r.store.checkpoints[0]
            assert delta.full and delta.lsn == 2
            assert {k for k, _ in delta.tables["stock"].upserts} == {APPLE, PEAR}

    run(body)


# ------------------------------------------------------------------------------- expiry


def test_expiry_timer_expires_a_due_reservation_durably() -> None:
    async def body() -> None:
        async with rig(OwnerLimits(timer_tick_s=0.005)) as r:
            await r.owner.mutate(3, set_stock(APPLE, 5, "s1"), None)
            reserved = await r.owner.mutate(3, reserve(APPLE, 2, "r1", ttl_s=30), None)
            assert isinstance(reserved, Reserved)
            rid = reserved.reservation.reservation_id
            await asyncio.sleep(0.03)
            assert len(r.store.durable[3]) == 2  # not due yet: no expiry record
            r.clock.now_ms = reserved.reservation.expires_at_ms
            await until(lambda: len(r.store.durable[3]) == 3, "the expiry record")
            expiry = r.store.durable[3][2].command
            assert isinstance(expiry, Expire) and expiry.reservation_ids == (rid,)
            found = await r.owner.reservation(3, "m1", rid, None)
            assert found is not None and found.state is ReservationState.EXPIRED
            assert (await r.owner.levels(3, (APPLE,), None))[0].reserved == 0

    run(body)


def test_expiry_timer_queues_at_most_one_tick_per_partition() -> None:
    async def body() -> None:
        limits = OwnerLimits(timer_tick_s=0.002, request_queue_max=50)
        async with rig(limits, partitions=(3, 5)) as r:
            await r.owner.mutate(5, set_stock(FIG, 5, "s1"), None)
            reserved = await r.owner.mutate(5, reserve(FIG, 1, "r1", ttl_s=30), None)
            assert isinstance(reserved, Reserved)
            r.store.flush_gate = asyncio.Event()
            stalled = mutate(r, 3, set_stock(APPLE, 1, "s2"))
            await until(lambda: len(r.store.flush_calls) == 3, "the stalled flush")
            r.clock.now_ms = reserved.reservation.expires_at_ms
            await asyncio.sleep(0.1)  # ~50 timer periods while the loop waits on the flush
            depth = r.owner.queue_depth()
            r.store.flush_gate.set()
            await stalled
            assert depth <= 1, f"{depth} expiry ticks queued for one partition"

    run(body)


# ----------------------------------------------------------------------------- shutdown


def test_close_finishes_the_checkpoint_in_flight_then_leaves_no_task_pending() -> None:
    async def body() -> None:
        outside = asyncio.all_tasks()
        limits = OwnerLimits(
            timer_tick_s=3600, checkpoint_records_max=1, recovery_backoff_s_max=0.01
        )
        async with rig(limits, partitions=(3, 5)) as r:
            # A checkpoint in flight, held by the store...
            r.store.checkpoint_gate = asyncio.Event()
            await r.owner.mutate(5, set_stock(FIG, 1, "f1"), None)
            await until(lambda: r.store.checkpoint_calls == 1, "the checkpoint to start")
            # ...and a recovery retrying against a store that stays down.
            r.store.fail_flushes, r.store.fail_loads = 1, 1_000_000
            with pytest.raises(FlushFailed):
                await r.owner.mutate(3, set_stock(APPLE, 1, "s1"), None)
            await until(lambda: len(r.store.loads) >= 3, "the recovery to retry")

            # Shutdown as the shard's main does it: drain, stop the loop, close.
            await r.owner.drain()
            assert r.loop_task is not None
            r.loop_task.cancel()
            await asyncio.wait([r.loop_task])
            closing = asyncio.create_task(r.owner.close())
            await settle()
            assert not closing.done(), "close() must let the checkpoint in flight finish"
            r.store.checkpoint_gate.set()
            await closing
            assert [[d.partition for d in group] for group in r.store.checkpoints] == [[5]]
            assert r.owner.recovering_partitions == [3]  # never recovered: cancelled
            assert asyncio.all_tasks() <= outside, asyncio.all_tasks() - outside
            # After close nothing is taken.
            with pytest.raises(NotOwner):
                await r.owner.mutate(5, set_stock(FIG, 2, "f2"), None)

    run(body)


def test_close_refuses_what_is_still_queued_as_not_applied() -> None:
    async def body() -> None:
        async with rig(start=False) as r:
            queued = mutate(r, 3, set_stock(APPLE, 1, "s1"))
            await settle()
            await r.owner.close()
            with pytest.raises(NotOwner) as refused:
                await queued
            assert not refused.value.recovering
            await asyncio.wait_for(r.owner.drain(), WAIT_S)  # refused work counts as done
            assert r.store.flush_calls == []

    run(body)


def test_loop_stopped_during_a_flush_answers_outcome_unknown_and_drops_the_partition() -> None:
    async def body() -> None:
        async with rig() as r:
            r.store.flush_gate = asyncio.Event()
            pending = mutate(r, 3, set_stock(APPLE, 1, "s1"))
            await until(lambda: len(r.store.flush_calls) == 1, "the flush to start")
            assert r.loop_task is not None
            r.loop_task.cancel()
            await asyncio.wait([r.loop_task])
            with pytest.raises(FlushFailed):
                await pending
            # Memory may be ahead of the store: it must not be served or checkpointed.
            assert not r.owner.owns(3)
            await r.owner.checkpoint_now()
            assert r.store.checkpoints == []

    run(body)
