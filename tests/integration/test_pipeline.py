"""The pipelined flush (DESIGN section 5.6) against a scripted store whose flushes end out of
step: each flush waits for its own gate and then commits, fails, commits and loses the reply,
or finds a partition fenced.

What must hold, whatever the schedule: a reply or an event never leaves before its own
commit; batches commit in order; while batch N flushes, N+1 is applied; if N fails, N+1's
items in N's partitions are refused (never sent, so not applied) and its other partitions
flush; a STRONG read never shows state a failed flush could lose and waits at most for the
flush in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inventory_core import (
    AvailabilityChanged,
    InsufficientStock,
    Outcome,
    Record,
    Reserved,
    StockChanged,
    StockLevel,
)
from shard_router.shard.owner import FlushFailed, NotOwner, Owner, OwnerLimits

from .test_owner import (
    APPLE,
    FIG,
    PEAR,
    Clock,
    Events,
    FakeStore,
    Rig,
    StoreDown,
    mutate,
    reserve,
    run,
    set_stock,
    settle,
    until,
)

COMMIT, FAIL, LOST_REPLY = "commit", "fail", "lost-reply"


@dataclass
class ScriptedStore(FakeStore):
    """Each flush call i waits for ``gates[i]``, then does ``script[i]`` (commit by default,
    or fail before the commit, or commit and raise, or fence the partitions named)."""

    script: dict[int, str | tuple[int, ...]] = field(default_factory=dict)
    gates: dict[int, asyncio.Event] = field(default_factory=dict)
    committed_calls: list[int] = field(default_factory=list)
    started: list[list[Record]] = field(default_factory=list)  # every flush call, in order
    in_flight: int = 0
    most_in_flight: int = 0

    def gate(self, call: int) -> asyncio.Event:
        return self.gates.setdefault(call, asyncio.Event())

    async def flush(
        self,
        records: Sequence[Record],
        epochs: dict[int, int],
        flushed_heads: dict[int, int],
        events: Sequence[AvailabilityChanged] = (),
        payloads: Sequence[bytes] = (),
    ) -> tuple[int, ...]:
        call = len(self.started)
        self.started.append(list(records))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate(call).wait()
        finally:
            self.in_flight -= 1
        action = self.script.get(call, COMMIT)
        if action == FAIL:
            raise StoreDown(f"flush {call} failed")
        if isinstance(action, tuple):
            for partition in action:
                self.epoch[partition] += 1  # someone else took it
        fenced = await super().flush(records, epochs, flushed_heads, events, payloads)
        if not fenced:
            self.committed_calls.append(call)
        if action == LOST_REPLY and not fenced:
            raise StoreDown(f"flush {call} committed, reply lost")
        return fenced


@contextlib.asynccontextmanager
async def scripted(partitions: Sequence[int] = (3, 5)) -> AsyncIterator[tuple[Rig, ScriptedStore]]:
    """A running owner of ``partitions`` over a ScriptedStore."""
    store, clock, events = ScriptedStore(), Clock(), Events()
    store.own(*partitions)
    owner = Owner(store, events, OwnerLimits(timer_tick_s=3600), clock)
    owner.adopt(await store.load(partitions), await store.epochs(partitions))
    store.loads.clear()
    rig = Rig(owner, store, clock, events)
    rig.start()
    try:
        yield rig, store
    finally:
        await rig.stop()


def durable_keys(store: FakeStore) -> set[tuple[int, int]]:
    return {(r.partition, r.lsn) for records in store.durable.values() for r in records}


def test_batch_n_plus_1_is_applied_while_n_flushes_and_each_replies_after_its_own_commit() -> None:
    async def body() -> None:
        async with scripted() as (r, store):
            first = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            await until(lambda: len(store.started) == 1, "flush 0")
            second = mutate(r, 5, set_stock(FIG, 4, "s2"))
            # Applied while flush 0 is in flight; its own flush waits for flush 0.
            await until(lambda: r.core(5).levels((FIG,), 0)[0].on_hand == 4, "batch 1 applied")
            await settle()
            assert len(store.started) == 1
            assert not first.done() and not second.done() and r.events.published == []

            store.gate(0).set()
            assert isinstance(await first, StockChanged)
            await until(lambda: len(store.started) == 2, "flush 1")
            await settle()
            assert not second.done()
            assert [e.key for batch in r.events.published for e in batch] == [APPLE]

            store.gate(1).set()
            assert isinstance(await second, StockChanged)
            assert store.committed_calls == [0, 1]
            assert [e.key for batch in r.events.published for e in batch] == [APPLE, FIG]

    run(body)


def test_failure_of_batch_n_refuses_n_plus_1_in_its_partitions_and_flushes_the_others() -> None:
    async def body() -> None:
        async with scripted() as (r, store):
            store.script[0] = FAIL
            store.load_gate = asyncio.Event()
            doomed = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            await until(lambda: len(store.started) == 1, "flush 0")
            on_top = mutate(r, 3, set_stock(PEAR, 3, "s2"))  # applied on flush 0's memory
            elsewhere = mutate(r, 5, set_stock(FIG, 4, "s3"))
            await until(lambda: r.core(5).levels((FIG,), 0)[0].on_hand == 4, "batch 1 applied")
            store.gate(0).set()
            with pytest.raises(FlushFailed):
                await doomed
            with pytest.raises(NotOwner) as refused:
                await on_top
            assert refused.value.recovering  # retryable: it was never sent
            await until(lambda: len(store.started) == 2, "flush 1")
            assert {rec.partition for rec in store.started[1]} == {5}
            store.gate(1).set()
            assert isinstance(await elsewhere, StockChanged)

            store.load_gate.set()
            await until(lambda: r.owner.owns(3), "recovery of partition 3")
            levels = await r.owner.levels(3, (APPLE, PEAR), None)
            assert [level.exists for level in levels] == [False, False]

    run(body)


def test_a_refusal_decided_on_unflushed_state_waits_for_that_flush() -> None:
    """INSUFFICIENT_STOCK because batch N took the last unit: if N fails, that answer was
    never true, so it is never given."""

    async def body() -> None:
        async with scripted() as (r, store):
            for call in (0, 1):
                store.gate(call).set()
            await mutate(r, 3, set_stock(APPLE, 1, "s1"))
            store.script[1] = FAIL
            store.gates[1] = asyncio.Event()
            store.load_gate = asyncio.Event()
            taker = mutate(r, 3, reserve(APPLE, 1, "r1"))
            await until(lambda: len(store.started) == 2, "flush 1")
            loser = mutate(r, 3, reserve(APPLE, 1, "r2"))
            await settle()
            assert not loser.done()
            store.gate(1).set()
            with pytest.raises(FlushFailed):
                await taker
            with pytest.raises(NotOwner):
                await loser

            # The same schedule with a commit: the refusal is the answer, after the commit.
            store.load_gate.set()
            await until(lambda: r.owner.owns(3), "recovery")
            store.gates[2] = asyncio.Event()
            taker = mutate(r, 3, reserve(APPLE, 1, "r3"))
            await until(lambda: len(store.started) == 3, "flush 2")
            loser = mutate(r, 3, reserve(APPLE, 1, "r4"))
            await settle()
            assert not loser.done()
            store.gate(2).set()
            assert isinstance(await taker, Reserved)
            assert isinstance(await loser, InsufficientStock)

    run(body)


def test_a_strong_read_waits_at_most_for_the_flush_in_flight() -> None:
    async def body() -> None:
        async with scripted() as (r, store):
            write = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            await until(lambda: len(store.started) == 1, "flush 0")
            behind = asyncio.create_task(r.owner.levels(3, (APPLE,), None))
            untouched = asyncio.create_task(r.owner.levels(5, (FIG,), None))
            assert (await untouched)[0].exists is False  # not behind the flush: answered now
            await settle()
            assert not behind.done()
            store.gate(0).set()
            await write
            assert (await behind)[0].on_hand == 10

    run(body)


def test_a_fenced_partition_in_a_pipelined_batch_is_refused_alone() -> None:
    async def body() -> None:
        async with scripted() as (r, store):
            store.script[1] = (3,)
            store.gate(1).set()
            store.gate(2).set()
            first = mutate(r, 5, set_stock(FIG, 1, "s0"))
            await until(lambda: len(store.started) == 1, "flush 0")
            fenced = mutate(r, 3, set_stock(APPLE, 10, "s1"))
            kept = mutate(r, 5, set_stock(FIG, 2, "s2"))
            await until(lambda: r.core(3).levels((APPLE,), 0)[0].on_hand == 10, "batch 1")
            store.gate(0).set()
            await first
            with pytest.raises(NotOwner) as refused:
                await fenced
            assert refused.value.recovering
            assert isinstance(await kept, StockChanged)
            assert [{rec.partition for rec in call} for call in store.started[1:]] == [
                {3, 5},
                {5},
            ]
            assert r.owner.stats.fenced == 1
            # The sink sent exactly what the ledger stored, each change encoded once (the
            # re-flush without partition 3 reused the batch's encodings).
            assert r.events.payloads == store.outbox
            assert len(store.outbox) == 2 and store.encoded == 3

    run(body)


def test_a_partition_dropped_while_its_batch_waited_is_refused_and_never_sent() -> None:
    async def body() -> None:
        async with scripted() as (r, store):
            store.gate(1).set()
            first = mutate(r, 3, set_stock(APPLE, 1, "s0"))
            await until(lambda: len(store.started) == 1, "flush 0")
            moved = mutate(r, 5, set_stock(FIG, 2, "s1"))
            await until(lambda: r.core(5).levels((FIG,), 0)[0].on_hand == 2, "batch 1")
            r.owner.drop([5])  # the ring gave it to another shard
            store.gate(0).set()
            await first
            with pytest.raises(NotOwner) as refused:
                await moved
            assert not refused.value.recovering  # redirect: it lives elsewhere now
            await settle()
            assert len(store.started) == 1

    run(body)


# ------------------------------------------------------------------ any schedule at all

schedules = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from([3, 5])),
        st.tuples(st.just("read"), st.sampled_from([3, 5])),
        # The oldest flush not yet ended ends: commit, fail, commit losing the reply, fence 3.
        st.tuples(st.just("end"), st.sampled_from([0, 1, 2, 3])),
    ),
    min_size=1,
    max_size=25,
)
ENDINGS: list[str | tuple[int, ...]] = [COMMIT, FAIL, LOST_REPLY, (3,)]
KEYS = {3: APPLE, 5: FIG}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules)
def test_no_answer_or_event_before_its_commit_and_one_flush_at_a_time_in_order(
    schedule: list[tuple[str, int]],
) -> None:
    async def body() -> None:
        async with scripted() as (r, store):
            writes: dict[str, tuple[asyncio.Task[Outcome], int]] = {}
            reads: list[tuple[asyncio.Task[tuple[StockLevel, ...]], int]] = []
            ended = 0

            def durable_level(partition: int) -> StockLevel:
                return store.rebuild(partition).levels((KEYS[partition],), 0)[0]

            def check() -> None:
                assert store.most_in_flight <= 1, "two flushes in flight at once"
                for idem, (task, partition) in writes.items():
                    if task.done() and not task.cancelled() and task.exception() is None:
                        assert isinstance(task.result(), StockChanged)
                        kept = [rec.command.idempotency_key for rec in store.durable[partition]]
                        assert idem in kept, f"{idem} answered before its commit"
                for read, partition in reads:
                    if read.done() and not read.cancelled() and read.exception() is None:
                        (level,) = read.result()
                        assert level.version <= durable_level(partition).version
                for batch in r.events.published:
                    for event in batch:
                        kept = {rec.lsn for rec in store.durable[event.partition]}
                        assert event.lsn in kept, "an event left before its commit"
                assert set(r.events.payloads) <= set(store.outbox), "sent what was not stored"

            for index, (kind, value) in enumerate(schedule):
                if kind == "write":
                    idem = f"w{index}"
                    task = mutate(r, value, set_stock(KEYS[value], index + 1, idem))
                    writes[idem] = (task, value)
                elif kind == "read":
                    reads.append(
                        (asyncio.create_task(r.owner.levels(value, (KEYS[value],), None)), value)
                    )
                else:
                    store.script[ended] = ENDINGS[value]
                    store.gate(ended).set()
                    ended += 1
                await settle()
                check()
            for call in range(ended, ended + len(schedule) + 1):
                store.gate(call).set()  # everything left commits
            await asyncio.gather(
                *(task for task, _ in writes.values()),
                *(read for read, _ in reads),
                return_exceptions=True,
            )
            check()
            for task, _ in writes.values():  # every answer is one the caller can act on
                error = task.exception()
                assert error is None or isinstance(error, FlushFailed | NotOwner), error

    run(body)
