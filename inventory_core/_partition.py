"""The state machine of one partition: apply and replay, in one serial order.

    step = partition.apply(command)      # live: validate, expire what is due, idempotency,
                                         # then the command's handler (_registry.py)
    partition.replay(record)             # recovery: execute a logged record again

``apply`` returns a ``Step``: the outcome, the ledger records to flush (zero or more: due
expiries come first as their own ``Expire`` records) and the change events. The state in
memory already includes the step; the shell must flush the records before it replies or
publishes, and must throw the partition away if the flush fails (DESIGN section 5).

Live apply and replay share ``_execute``: a record is the command itself, with its time, so
replaying it from the same state reproduces the same state, outcome and events. The rules
live in ``rules/``, the tables and invariants in ``_state.py``, checkpoints in
``_checkpoint.py``; this module only orders them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import _checkpoint, _idempotency
from . import _limits as limits
from ._checkpoint import CheckpointDelta
from ._commands import Command, Expire, KeyedCommand, MarkStale
from ._health import LocationHealth
from ._idempotency import IdempotencyEntry, Scope, legacy_fingerprint
from ._model import (
    AvailabilityChanged,
    FeedLocation,
    InventoryKey,
    Reservation,
    ReservationState,
    StockLevel,
    StockRow,
)
from ._outcomes import (
    Accepted,
    Expired,
    HotKeyPart,
    InsufficientStock,
    KeySplit,
    Outcome,
    OverCommitted,
    is_accepted,
)
from ._registry import BY_TYPE, kind_of
from ._state import Effects, PartitionState
from ._usage import ProcessUsage
from .rules import staleness


@dataclass(frozen=True, slots=True)
class Record:
    """One ledger record: a command that was accepted, at its lsn in the partition."""

    partition: int
    lsn: int
    command: Command

    @property
    def kind(self) -> str:
        return kind_of(self.command)

    @property
    def recorded_at_ms(self) -> int:
        return self.command.now_ms


@dataclass(frozen=True, slots=True)
class Step:
    outcome: Outcome
    records: tuple[Record, ...]
    events: tuple[AvailabilityChanged, ...]


@dataclass(frozen=True, slots=True)
class PartitionSnapshot:
    """The whole state, comparable: replay must equal live."""

    partition: int
    head_lsn: int
    tables: dict[str, dict[Any, Any]]

    @property
    def stock(self) -> dict[InventoryKey, StockRow]:
        return self.tables["stock"]

    @property
    def reservations(self) -> dict[str, Reservation]:
        return self.tables["reservations"]

    @property
    def idempotency(self) -> dict[Scope, IdempotencyEntry]:
        return self.tables["idempotency"]


class Partition:
    def __init__(self, partition: int, head_lsn: int = 0) -> None:
        self.partition = partition
        self.head_lsn = head_lsn
        self._state = PartitionState(partition)
        self._checkpoint_full_pending = True

    # ----------------------------------------------------------------- the two entry points

    def apply(self, command: Command) -> Step:
        """Decide a command at its time; see the module docstring for what the caller owes."""
        kind = BY_TYPE[type(command)]
        invalid = kind.validate(command)
        if invalid is not None:
            return Step(invalid, (), ())
        records: list[Record] = []
        events: list[AvailabilityChanged] = []
        due_batches = self._state.expiry.pop_due(
            command.now_ms, limits.expiry_batch_reservations_max
        )
        for due in due_batches:
            self._run(Expire(due, command.now_ms), records, events)
        if isinstance(command, Expire):
            outcome: Outcome = Expired(tuple(i for r in records for i in _expired_ids(r)))
            return Step(outcome, tuple(records), tuple(events))
        if kind.remembered:
            retry = self._retry_answer(command)  # type: ignore[arg-type]
            if retry is not None:
                return Step(retry, tuple(records), tuple(events))
        outcome = self._run(command, records, events)
        return Step(outcome, tuple(records), tuple(events))

    def _retry_answer(self, command: KeyedCommand) -> Outcome | None:
        """The original answer to a retry (or a refusal), or None to decide afresh."""
        retry = _idempotency.answer(
            self._state.idempotency,
            (command.merchant_id, command.idempotency_key),
            lambda: _fingerprint(command),
            lambda: legacy_fingerprint(command),
        )
        if isinstance(retry, InsufficientStock) and not retry.kept:
            return replace(retry, kept=True)  # remembered before refusals said so
        return retry if retry is not None else self._state.refuse_new_answer()

    def replay(self, record: Record) -> tuple[AvailabilityChanged, ...]:
        """Apply a logged record again; anything but acceptance means corruption."""
        if record.partition != self.partition or record.lsn != self.head_lsn + 1:
            raise AssertionError(
                f"record {record.partition}/{record.lsn} does not follow "
                f"{self.partition}/{self.head_lsn}"
            )
        events: list[AvailabilityChanged] = []
        self._state.live_apply = False
        try:
            outcome, logged = self._execute(record.command, record.lsn, events)
        finally:
            self._state.live_apply = True
        if logged is None:
            raise AssertionError(f"replayed record {record.lsn} was refused: {outcome}")
        if logged != record.command:
            raise AssertionError(f"replayed record {record.lsn} would log {logged}")
        self.head_lsn = record.lsn
        return tuple(events)

    def expire_due(self, now_ms: int) -> Step:
        """The expiry timer's command: expire everything due at now_ms."""
        return self.apply(Expire((), now_ms))

    def on_timer(self, now_ms: int, silent_ms: int = limits.feed_silence_stale_ms) -> Step:
        """The shell's timer: expire what is due, and mark stale the locations whose feeds
        have been silent for ``silent_ms`` (DESIGN section 9)."""
        due = staleness.stale_due(self._state, now_ms, silent_ms)
        if not due:
            return self.expire_due(now_ms)
        return self.apply(MarkStale(due, now_ms, silent_ms))

    def next_timer_ms(self, silent_ms: int = limits.feed_silence_stale_ms) -> int | None:
        """When the timer next has work: a reservation expires or a location goes stale."""
        stale_ms = staleness.next_stale_ms(self._state, silent_ms)
        times = (self._state.expiry.next_due_ms(), stale_ms)
        due = [t for t in times if t is not None]
        return min(due) if due else None

    # ----------------------------------------------------------------------------- reads

    def levels(self, keys: Iterable[InventoryKey], now_ms: int) -> tuple[StockLevel, ...]:
        """Levels as of now_ms: reservations past expiry no longer count, timer or not."""
        state = self._state
        due: dict[InventoryKey, int] = {}
        for reservation_id in state.expiry.due(now_ms):
            for line in state.reservations[reservation_id].lines:
                due[line.key] = due.get(line.key, 0) + line.quantity
        answer = []
        for key in keys:
            row = state.stock.get(key)
            if row is not None and key in due:
                row = replace(row, reserved=row.reserved - due[key])
            answer.append(StockLevel.of(key, row))
        return tuple(answer)

    def reservation(self, merchant_id: str, reservation_id: str, now_ms: int) -> Reservation | None:
        found = self._state.reservations.get(reservation_id)
        if found is None or found.merchant_id != merchant_id:
            return None
        if found.state is ReservationState.ACTIVE and found.expires_at_ms <= now_ms:
            return replace(found, state=ReservationState.EXPIRED, state_changed_at_ms=now_ms)
        return found

    def hot_key_parts(self, keys: Iterable[InventoryKey], now_ms: int) -> tuple[HotKeyPart, ...]:
        """The hot keys' parts this partition holds among ``keys`` (homes and buckets; any
        other key is left out), in the order asked, with levels as of ``now_ms``."""
        state, answer = self._state, []
        for key in dict.fromkeys(keys):
            split, quota = state.splits.get(key), state.quotas.get(key)
            if split is None and quota is None:
                continue
            (level,) = self.levels([key], now_ms)
            if split is not None:
                view = KeySplit(level, split.buckets, split.generation, split.merging)
                answer.append(HotKeyPart(level, split=view, sending=split.sending))
            elif quota is not None:
                answer.append(HotKeyPart(level, None, quota.home, quota.granted, quota.sending))
        return tuple(answer)

    @property
    def split_count(self) -> int:
        return len(self._state.splits)

    @property
    def split_keys(self) -> tuple[InventoryKey, ...]:
        """The hot keys whose home this partition is."""
        return tuple(self._state.splits)

    @property
    def live_reservation_count(self) -> int:
        return self._state.live_reservation_count

    @property
    def key_count(self) -> int:
        return len(self._state.stock)

    @property
    def idempotency_entry_count(self) -> int:
        return len(self._state.idempotency)

    def attach(self, usage: ProcessUsage) -> None:
        """Count into (and be bounded by) the totals of the process that adopted it."""
        self._state.attach(usage)

    def detach(self) -> None:
        """The process dropped it: its counts leave the process totals."""
        self._state.detach()

    def next_expiry_ms(self) -> int | None:
        """When the earliest live reservation expires."""
        return self._state.expiry.next_due_ms()

    @property
    def over_committed_count(self) -> int:
        """How many keys are over-committed now (kept as they change: O(1))."""
        return len(self._state.over_committed)

    @property
    def stale_location_count(self) -> int:
        """How many locations are stale now (their feeds silent): O(1)."""
        return len(self._state.stale_keys)

    def over_committed_at(
        self, merchant_id: str, location_ids: Iterable[str]
    ) -> tuple[OverCommitted, ...]:
        """The merchant's over-committed keys at these locations, in key order: each one's
        exposure and the live reservations at risk, newest first (DESIGN section 2)."""
        state, locations = self._state, set(location_ids)
        found = sorted(
            key
            for key in state.over_committed
            if key.merchant_id == merchant_id and key.location_id in locations
        )
        answer = []
        for key in found:
            over = state.over_commit(key)
            assert over is not None, key
            answer.append(OverCommitted(key, over))
        return tuple(answer)

    def feed_health(
        self, merchant_id: str, location_ids: Iterable[str], now_ms: int
    ) -> tuple[LocationHealth, ...]:
        """The merchant's fed locations among these (in the order asked; a location that
        never had a feed is left out): each source's last event, arrival and lag, and since
        when the location is stale."""
        feeds = self._state.feed_locations
        answer = []
        for location_id in dict.fromkeys(location_ids):
            location = FeedLocation(merchant_id, location_id)
            feed = feeds.get(location)
            if feed is not None:
                answer.append(LocationHealth(location, feed, now_ms))
        return tuple(answer)

    def over_committed(self) -> dict[InventoryKey, int]:
        """Exposure (-available) of every over-committed key (from the index: no scan)."""
        stock = self._state.stock
        return {key: -stock[key].available for key in self._state.over_committed}

    # ----------------------------------------------------------------------- the pipeline

    def _run(
        self, command: Command, records: list[Record], events: list[AvailabilityChanged]
    ) -> Outcome:
        lsn = self.head_lsn + 1
        outcome, logged = self._execute(command, lsn, events)
        if logged is not None:
            self.head_lsn = lsn
            records.append(Record(self.partition, lsn, logged))
        return outcome

    def _execute(
        self, command: Command, lsn: int, events: list[AvailabilityChanged]
    ) -> tuple[Outcome, Command | None]:
        """Decide and, when accepted, change state; the outcome and the command to log (None:
        nothing to log, and nothing changed). The one code path of apply and replay."""
        kind = BY_TYPE[type(command)]
        state = self._state
        emitted = len(events)
        outcome: Outcome = kind.handle(
            state, command, Effects(self.partition, lsn, command.now_ms, events)
        )
        if not is_accepted(outcome):
            if not kind.keeps_refusal(command, outcome):
                return outcome, None
            assert len(events) == emitted, f"a kept refusal of {kind.name} changed keys"
            assert isinstance(outcome, InsufficientStock), outcome
            outcome = replace(outcome, kept=True)
            logged: Command | None = command
        else:
            logged = kind.record_of(command, outcome)
        if logged is None:
            assert len(events) == emitted, f"{kind.name} logs nothing but changed keys"
            return outcome, None
        # Retention runs on logged records only, so replay forgets exactly as live did.
        state.forget_old_answers(command.now_ms)
        state.forget_finished(command.now_ms)
        if kind.from_caller and kind.remembered:
            self._remember(command, outcome, lsn)  # type: ignore[arg-type]
        return outcome, logged

    def _remember(
        self, command: KeyedCommand, outcome: Accepted | InsufficientStock, lsn: int
    ) -> None:
        entry = IdempotencyEntry(
            command.merchant_id,
            command.idempotency_key,
            kind_of(command),
            _fingerprint(command),
            outcome,
            lsn,
            command.now_ms,
        )
        self._state.remember(entry)

    # ---------------------------------------------------------- checkpoints and recovery

    def take_checkpoint(self) -> CheckpointDelta:
        """What changed since the last checkpoint (everything, the first time)."""
        delta = _checkpoint.take(self._state, self.head_lsn, self._checkpoint_full_pending)
        self._checkpoint_full_pending = False
        return delta

    def checkpoint_failed(self) -> None:
        """A delta was lost: the next checkpoint must write everything."""
        self._checkpoint_full_pending = True

    @classmethod
    def restore(
        cls, partition: int, lsn: int, tables: Mapping[str, Iterable[tuple[Any, Any]]]
    ) -> Partition:
        """Rebuild from a checkpoint; the ledger records after ``lsn`` are replayed next."""
        restored = cls(partition, lsn)
        _checkpoint.restore(restored._state, tables)
        restored._checkpoint_full_pending = False
        return restored

    def snapshot(self) -> PartitionSnapshot:
        tables = {name: table.copy() for name, table in self._state.tables.items()}
        return PartitionSnapshot(self.partition, self.head_lsn, tables)

    def check_invariants(self) -> None:
        """The full check, for tests after every step. Raises AssertionError."""
        self._state.check_invariants()


def fingerprint(command: KeyedCommand) -> str:
    """Identity of a request's payload, without its time: retries compare equal."""
    return _fingerprint(command)


def _fingerprint(command: Command) -> str:
    return _idempotency.fingerprint(BY_TYPE[type(command)].codec.encode(command))


def _expired_ids(record: Record) -> tuple[str, ...]:
    command = record.command
    return command.reservation_ids if isinstance(command, Expire) else ()
