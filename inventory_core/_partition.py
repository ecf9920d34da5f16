"""The state machine of one partition: every stock rule, applied in one serial order.

    step = partition.apply(command)      # live: validate, expire what is due, execute
    partition.replay(record)             # recovery: execute a logged record again

``apply`` returns a ``Step``: the outcome, the ledger records to flush (zero or more: due
expiries come first as their own ``Expire`` records) and the change events. The state in
memory already includes the step; the shell must flush the records before it replies or
publishes, and must throw the partition away if the flush fails (DESIGN section 5).

Live apply and replay share ``_execute``: a record is the command itself, with its time, so
replaying it from the same state reproduces the same state, outcome and events.

Invariants (``check_invariants``), true after every step:
  - reserved of a key equals the sum of the live reservation lines holding it;
  - no live reservation holds a non-positive quantity; reserved >= 0;
  - versions only increase; the head lsn increases by one per record.
Online operations never take available below zero: ``Reserve`` admits a line only when its
quantity fits in available, and nothing else raises reserved.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from . import _limits as limits
from ._commands import (
    AdjustStock,
    ClientCommand,
    Command,
    Commit,
    Expire,
    Extend,
    Release,
    Reserve,
    SetSafetyStock,
    SetStock,
    kind_of,
)
from ._model import (
    EMPTY_ROW,
    AvailabilityChanged,
    ChangeReason,
    InventoryKey,
    Line,
    Reservation,
    ReservationState,
    StockLevel,
    StockRow,
    reservation_id_for,
)
from ._outcomes import (
    Accepted,
    CapacityExhausted,
    Committed,
    Expired,
    Extended,
    IdempotencyKeyReused,
    InsufficientStock,
    Invalid,
    Outcome,
    OverCommit,
    Released,
    ReservationNotActive,
    ReservationNotFound,
    Reserved,
    ShortLine,
    StockChanged,
    VersionMismatch,
    is_accepted,
)
from ._validate import effective_ttl_s, validate


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
class IdempotencyEntry:
    """The original answer to a mutation, kept for retries with the same key."""

    merchant_id: str
    idempotency_key: str
    kind: str
    fingerprint: str
    outcome: Accepted
    lsn: int
    recorded_at_ms: int


@dataclass(frozen=True, slots=True)
class CheckpointDelta:
    """What changed since the previous checkpoint, for an upsert at ``lsn``."""

    partition: int
    lsn: int
    full: bool
    stock: tuple[tuple[InventoryKey, StockRow], ...]
    reservations: tuple[Reservation, ...]
    reservations_removed: tuple[str, ...]
    idempotency: tuple[IdempotencyEntry, ...]
    idempotency_removed: tuple[tuple[str, str], ...]

    @property
    def row_count(self) -> int:
        """Rows this delta writes: what bounds one checkpoint transaction."""
        return len(self.stock) + len(self.reservations) + len(self.idempotency)


@dataclass(frozen=True, slots=True)
class PartitionSnapshot:
    """The whole state, comparable: replay must equal live."""

    partition: int
    head_lsn: int
    stock: dict[InventoryKey, StockRow]
    reservations: dict[str, Reservation]
    idempotency: dict[tuple[str, str], IdempotencyEntry]


@dataclass(slots=True)
class _Dirty:
    """Insertion-ordered sets (dicts) of what changed since the last checkpoint."""

    keys: dict[InventoryKey, None] = field(default_factory=dict)
    reservations: dict[str, None] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], None] = field(default_factory=dict)


def fingerprint(command: ClientCommand) -> str:
    """Identity of a request's payload, without its time: retries compare equal."""
    payload = repr(replace(command, now_ms=0))
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


class Partition:
    def __init__(self, partition: int, head_lsn: int = 0) -> None:
        self.partition = partition
        self.head_lsn = head_lsn
        self._stock: dict[InventoryKey, StockRow] = {}
        self._live: dict[str, Reservation] = {}
        # Finished reservations in the order they finished, oldest first.
        self._finished: OrderedDict[str, Reservation] = OrderedDict()
        # (expires_at_ms, reservation_id); stale entries (extended or finished) are skipped.
        self._expiry: list[tuple[int, str]] = []
        # Live reservations holding each key: reservation_id -> quantity, oldest first.
        self._holds: dict[InventoryKey, dict[str, int]] = {}
        # Keyed by (merchant_id, idempotency_key), oldest first.
        self._idempotency: OrderedDict[tuple[str, str], IdempotencyEntry] = OrderedDict()
        self._dirty = _Dirty()
        self._checkpoint_full_pending = True

    # ----------------------------------------------------------------- the two entry points

    def apply(self, command: Command) -> Step:
        """Decide a command at its time; see the module docstring for what the caller owes."""
        invalid = validate(command)
        if invalid is not None:
            return Step(invalid, (), ())
        records: list[Record] = []
        events: list[AvailabilityChanged] = []
        for due in self._due_expiry_batches(command.now_ms):
            self._run(Expire(due, command.now_ms), records, events)
        if isinstance(command, Expire):
            outcome: Outcome = Expired(tuple(i for r in records for i in _expired_ids(r)))
            return Step(outcome, tuple(records), tuple(events))
        retry = self._idempotent_answer(command)
        if retry is not None:
            return Step(retry, tuple(records), tuple(events))
        outcome = self._run(command, records, events)
        return Step(outcome, tuple(records), tuple(events))

    def replay(self, record: Record) -> tuple[AvailabilityChanged, ...]:
        """Apply a logged record again; anything but acceptance means corruption."""
        if record.partition != self.partition or record.lsn != self.head_lsn + 1:
            raise AssertionError(
                f"record {record.partition}/{record.lsn} does not follow "
                f"{self.partition}/{self.head_lsn}"
            )
        events: list[AvailabilityChanged] = []
        outcome = self._execute(record.command, record.lsn, events)
        if not is_accepted(outcome):
            raise AssertionError(f"replayed record {record.lsn} was refused: {outcome}")
        self.head_lsn = record.lsn
        return tuple(events)

    def expire_due(self, now_ms: int) -> Step:
        """The expiry timer's command: expire everything due at now_ms."""
        return self.apply(Expire((), now_ms))

    # ----------------------------------------------------------------------------- reads

    def levels(self, keys: Iterable[InventoryKey], now_ms: int) -> tuple[StockLevel, ...]:
        """Levels as of now_ms: reservations past expiry no longer count, timer or not."""
        due = self._due_holds(now_ms)
        answer = []
        for key in keys:
            row = self._stock.get(key)
            if row is not None and key in due:
                row = replace(row, reserved=row.reserved - due[key])
            answer.append(StockLevel.of(key, row))
        return tuple(answer)

    def reservation(self, merchant_id: str, reservation_id: str, now_ms: int) -> Reservation | None:
        found = self._live.get(reservation_id) or self._finished.get(reservation_id)
        if found is None or found.merchant_id != merchant_id:
            return None
        if found.state is ReservationState.ACTIVE and found.expires_at_ms <= now_ms:
            return replace(found, state=ReservationState.EXPIRED, state_changed_at_ms=now_ms)
        return found

    @property
    def live_reservation_count(self) -> int:
        return len(self._live)

    @property
    def key_count(self) -> int:
        return len(self._stock)

    def next_expiry_ms(self) -> int | None:
        """When the earliest live reservation expires (stale heap entries dropped)."""
        while self._expiry and not self._is_due_entry(self._expiry[0], None):
            heapq.heappop(self._expiry)
        return self._expiry[0][0] if self._expiry else None

    def over_committed(self) -> dict[InventoryKey, int]:
        """Exposure (-available) of every over-committed key."""
        return {k: -row.available for k, row in self._stock.items() if row.available < 0}

    # ----------------------------------------------------------------------- the pipeline

    def _run(
        self, command: Command, records: list[Record], events: list[AvailabilityChanged]
    ) -> Outcome:
        lsn = self.head_lsn + 1
        outcome = self._execute(command, lsn, events)
        if is_accepted(outcome):
            self.head_lsn = lsn
            records.append(Record(self.partition, lsn, command))
        return outcome

    def _execute(self, command: Command, lsn: int, events: list[AvailabilityChanged]) -> Outcome:
        """Decide and, when accepted, change state. The one code path of apply and replay."""
        match command:
            case Expire():
                outcome: Outcome = self._expire(command, lsn, events)
            case Reserve():
                outcome = self._reserve(command, lsn, events)
            case Commit():
                outcome = self._commit(command, lsn, events)
            case Release():
                outcome = self._release(command, lsn, events)
            case Extend():
                outcome = self._extend(command)
            case AdjustStock() | SetStock() | SetSafetyStock():
                outcome = self._set_counts(command, lsn, events)
        if is_accepted(outcome):
            # Retention runs on accepted records only, so replay forgets exactly as live did.
            self._forget_old(command.now_ms)
            if not isinstance(command, Expire):
                self._remember(command, outcome, lsn)
        return outcome

    # ------------------------------------------------------------------------ the rules

    def _reserve(self, command: Reserve, lsn: int, events: list[AvailabilityChanged]) -> Outcome:
        if len(self._live) >= limits.reservations_live_max:
            return CapacityExhausted("reservations_live_max", limits.reservations_live_max)
        wanted: dict[InventoryKey, int] = {}
        for line in command.lines:  # two lines on one key are checked against their sum
            wanted[line.key] = wanted.get(line.key, 0) + line.quantity
        rows = {key: self._stock.get(key, EMPTY_ROW) for key in wanted}
        if any(quantity > rows[key].available for key, quantity in wanted.items()):
            return InsufficientStock(
                tuple(ShortLine(k, q, max(rows[k].available, 0)) for k, q in wanted.items())
            )
        first = command.lines[0].key
        reservation = Reservation(
            reservation_id=reservation_id_for(self.partition, lsn),
            merchant_id=first.merchant_id,
            location_id=first.location_id,
            lines=tuple(Line(k, q) for k, q in wanted.items()),
            state=ReservationState.ACTIVE,
            created_at_ms=command.now_ms,
            expires_at_ms=command.now_ms + effective_ttl_s(command.ttl_s) * 1000,
            state_changed_at_ms=command.now_ms,
            created_lsn=lsn,
        )
        for key, quantity in wanted.items():
            self._change(
                key,
                lsn,
                command.now_ms,
                ChangeReason.RESERVATION,
                events,
                reserved=rows[key].reserved + quantity,
            )
            self._holds.setdefault(key, {})[reservation.reservation_id] = quantity
        self._put_live(reservation)
        return Reserved(reservation, self._levels_now(wanted))

    def _commit(self, command: Commit, lsn: int, events: list[AvailabilityChanged]) -> Outcome:
        found = self._active(command.merchant_id, command.reservation_id)
        if not isinstance(found, Reservation):
            return found
        held = {line.key: line.quantity for line in found.lines}
        taken = {key: held[key] for key in held} if not command.lines else dict.fromkeys(held, 0)
        for index, line in enumerate(command.lines):
            if line.key not in held:
                return _invalid(f"lines[{index}].key", "not held by this reservation")
            if line.quantity > held[line.key]:
                return _invalid(
                    f"lines[{index}].quantity",
                    f"exceeds the {held[line.key]} units the reservation holds",
                )
            taken[line.key] = line.quantity
        for key, quantity in held.items():
            row = self._stock[key]
            self._change(
                key,
                lsn,
                command.now_ms,
                ChangeReason.COMMIT,
                events,
                reserved=row.reserved - quantity,
                on_hand=row.on_hand - taken[key],
            )
        committed = tuple(Line(k, q) for k, q in taken.items() if q > 0)
        done = self._finish(found, ReservationState.COMMITTED, lsn, command.now_ms, committed)
        return Committed(done, self._levels_now(held))

    def _release(self, command: Release, lsn: int, events: list[AvailabilityChanged]) -> Outcome:
        found = self._active(command.merchant_id, command.reservation_id)
        if not isinstance(found, Reservation):
            return found
        self._return_holds(found, lsn, command.now_ms, ChangeReason.RELEASE, events)
        done = self._finish(found, ReservationState.RELEASED, lsn, command.now_ms, ())
        return Released(done, self._levels_now({line.key: 0 for line in found.lines}))

    def _extend(self, command: Extend) -> Outcome:
        found = self._active(command.merchant_id, command.reservation_id)
        if not isinstance(found, Reservation):
            return found
        extended = replace(found, expires_at_ms=command.now_ms + command.ttl_s * 1000)
        self._live[extended.reservation_id] = extended
        self._dirty.reservations[extended.reservation_id] = None
        if extended.expires_at_ms != found.expires_at_ms:  # one heap entry per expiry
            heapq.heappush(self._expiry, (extended.expires_at_ms, extended.reservation_id))
        return Extended(extended)

    def _expire(self, command: Expire, lsn: int, events: list[AvailabilityChanged]) -> Outcome:
        # In id order: the order finished reservations are kept (and forgotten) in must be
        # one a checkpoint can restore, by (finished_lsn, reservation_id).
        for reservation_id in sorted(command.reservation_ids):
            found = self._live.get(reservation_id)
            if found is None or found.expires_at_ms > command.now_ms:
                raise AssertionError(f"expiry of {reservation_id} that is not due: {found}")
            self._return_holds(found, lsn, command.now_ms, ChangeReason.EXPIRY, events)
            self._finish(found, ReservationState.EXPIRED, lsn, command.now_ms, ())
        return Expired(command.reservation_ids)

    def _set_counts(
        self,
        command: AdjustStock | SetStock | SetSafetyStock,
        lsn: int,
        events: list[AvailabilityChanged],
    ) -> Outcome:
        key = command.key
        row = self._stock.get(key, EMPTY_ROW)
        if key not in self._stock and len(self._stock) >= limits.partition_keys_max:
            return CapacityExhausted("partition_keys_max", limits.partition_keys_max)
        match command:
            case AdjustStock():
                on_hand, safety_stock = row.on_hand + command.delta, row.safety_stock
                assert command.reason is not None, "validated"
                reason = ChangeReason(command.reason.value)
                if abs(on_hand) > limits.stock_quantity_max:
                    return _invalid("delta", f"on_hand would leave ±{limits.stock_quantity_max}")
            case SetStock():
                on_hand, safety_stock = command.on_hand, row.safety_stock
                reason = ChangeReason.SET_STOCK
            case SetSafetyStock():
                on_hand, safety_stock = row.on_hand, command.safety_stock
                reason = ChangeReason.SET_SAFETY_STOCK
        expected = getattr(command, "expected_version", None)
        if expected is not None and expected != row.version:
            return VersionMismatch(key, expected, row.version)
        if key not in self._stock or (on_hand, safety_stock) != (row.on_hand, row.safety_stock):
            self._change(
                key, lsn, command.now_ms, reason, events, on_hand=on_hand, safety_stock=safety_stock
            )
        level = self._levels_now({key: 0})[0]
        return StockChanged(level, self._over_commit(key))

    # --------------------------------------------------------------------- state helpers

    def _change(
        self,
        key: InventoryKey,
        lsn: int,
        now_ms: int,
        reason: ChangeReason,
        events: list[AvailabilityChanged],
        **counts: int,
    ) -> None:
        before = self._stock.get(key, EMPTY_ROW)
        after = replace(before, version=before.version + 1, **counts)
        if after.reserved < 0:
            raise AssertionError(f"reserved of {key} would go negative: {after}")
        self._stock[key] = after
        self._dirty.keys[key] = None
        events.append(AvailabilityChanged(key, self.partition, lsn, reason, before, after, now_ms))

    def _return_holds(
        self,
        reservation: Reservation,
        lsn: int,
        now_ms: int,
        reason: ChangeReason,
        events: list[AvailabilityChanged],
    ) -> None:
        for line in reservation.lines:
            row = self._stock[line.key]
            self._change(
                line.key, lsn, now_ms, reason, events, reserved=row.reserved - line.quantity
            )

    def _active(self, merchant_id: str, reservation_id: str) -> Reservation | Outcome:
        found = self._live.get(reservation_id) or self._finished.get(reservation_id)
        if found is None or found.merchant_id != merchant_id:
            return ReservationNotFound(reservation_id)
        if found.state is not ReservationState.ACTIVE:
            return ReservationNotActive(reservation_id, found.state, found.state_changed_at_ms)
        return found

    def _put_live(self, reservation: Reservation) -> None:
        self._live[reservation.reservation_id] = reservation
        self._dirty.reservations[reservation.reservation_id] = None
        heapq.heappush(self._expiry, (reservation.expires_at_ms, reservation.reservation_id))

    def _finish(
        self,
        reservation: Reservation,
        state: ReservationState,
        lsn: int,
        now_ms: int,
        committed: tuple[Line, ...],
    ) -> Reservation:
        done = replace(
            reservation,
            state=state,
            state_changed_at_ms=now_ms,
            committed_lines=committed,
            finished_lsn=lsn,
        )
        del self._live[reservation.reservation_id]
        for line in reservation.lines:
            holders = self._holds[line.key]
            del holders[reservation.reservation_id]
            if not holders:
                del self._holds[line.key]
        self._finished[done.reservation_id] = done
        self._dirty.reservations[done.reservation_id] = None
        return done

    def _over_commit(self, key: InventoryKey) -> OverCommit | None:
        exposure = -self._stock[key].available
        if exposure <= 0:
            return None
        at_risk: list[str] = []
        covered = 0
        holders = self._holds.get(key, {})
        newest_first = sorted(holders, key=lambda rid: -self._live[rid].created_lsn)
        for reservation_id in newest_first:
            if covered >= exposure:
                break
            at_risk.append(reservation_id)
            covered += holders[reservation_id]
        return OverCommit(exposure, tuple(at_risk))

    def _levels_now(self, keys: Iterable[InventoryKey]) -> tuple[StockLevel, ...]:
        return tuple(StockLevel.of(key, self._stock.get(key)) for key in keys)

    # ------------------------------------------------------------------------- expiry

    def _is_due_entry(self, entry: tuple[int, str], now_ms: int | None) -> bool:
        """True if the heap entry is current (and due, when now_ms is given)."""
        expires_at_ms, reservation_id = entry
        live = self._live.get(reservation_id)
        current = live is not None and live.expires_at_ms == expires_at_ms
        return current and (now_ms is None or expires_at_ms <= now_ms)

    def _due_expiry_batches(self, now_ms: int) -> Iterable[tuple[str, ...]]:
        """Pop due reservations in expiry order, in bounded batches."""
        while self._expiry and self._expiry[0][0] <= now_ms:
            batch: list[str] = []
            while (
                self._expiry
                and self._expiry[0][0] <= now_ms
                and len(batch) < limits.expiry_batch_reservations_max
            ):
                entry = heapq.heappop(self._expiry)
                if self._is_due_entry(entry, now_ms) and entry[1] not in batch:
                    batch.append(entry[1])
            if batch:
                yield tuple(batch)

    def _due_holds(self, now_ms: int) -> dict[InventoryKey, int]:
        """Units per key held by reservations that are due but not yet expired.

        Walks only the due part of the heap: a node later than now_ms has no due children.
        """
        due: dict[InventoryKey, int] = {}
        counted: dict[str, None] = {}  # a reservation counts once, whatever the heap holds
        pending = [0] if self._expiry else []
        while pending:
            index = pending.pop()
            entry = self._expiry[index]
            if entry[0] > now_ms:
                continue
            if self._is_due_entry(entry, now_ms) and entry[1] not in counted:
                counted[entry[1]] = None
                for line in self._live[entry[1]].lines:
                    due[line.key] = due.get(line.key, 0) + line.quantity
            pending.extend(i for i in (2 * index + 1, 2 * index + 2) if i < len(self._expiry))
        return due

    # -------------------------------------------------------------------- idempotency

    def _idempotent_answer(self, command: ClientCommand) -> Outcome | None:
        entry = self._idempotency.get((command.merchant_id, command.idempotency_key))
        if entry is None:
            if len(self._idempotency) >= limits.idempotency_keys_max:
                return CapacityExhausted("idempotency_keys_max", limits.idempotency_keys_max)
            return None
        if entry.fingerprint != fingerprint(command):
            return IdempotencyKeyReused(command.idempotency_key, entry.kind)
        return entry.outcome

    def _remember(self, command: Command, outcome: Outcome, lsn: int) -> None:
        assert not isinstance(command, Expire) and is_accepted(outcome)
        scope = (command.merchant_id, command.idempotency_key)
        self._idempotency[scope] = IdempotencyEntry(
            command.merchant_id,
            command.idempotency_key,
            kind_of(command),
            fingerprint(command),
            outcome,  # type: ignore[arg-type]  # accepted, asserted above
            lsn,
            command.now_ms,
        )
        self._dirty.idempotency[scope] = None

    def _forget_old(self, now_ms: int) -> None:
        """Drop idempotency keys and finished reservations past their retention."""
        idempotency_horizon_ms = now_ms - limits.idempotency_retention_ms
        while self._idempotency:
            scope, entry = next(iter(self._idempotency.items()))
            if entry.recorded_at_ms >= idempotency_horizon_ms:
                break
            del self._idempotency[scope]
            self._dirty.idempotency[scope] = None
        finished_horizon_ms = now_ms - limits.reservations_finished_retention_ms
        while self._finished:
            reservation_id, done = next(iter(self._finished.items()))
            too_many = len(self._finished) > limits.reservations_finished_max
            if not too_many and done.state_changed_at_ms >= finished_horizon_ms:
                break
            del self._finished[reservation_id]
            self._dirty.reservations[reservation_id] = None

    # ---------------------------------------------------------- checkpoints and recovery

    def take_checkpoint(self) -> CheckpointDelta:
        """What changed since the last checkpoint (everything, the first time)."""
        full = self._checkpoint_full_pending
        keys = self._stock if full else self._dirty.keys
        reservation_ids: Iterable[str] = (
            list(self._live) + list(self._finished) if full else self._dirty.reservations
        )
        scopes: Iterable[tuple[str, str]] = self._idempotency if full else self._dirty.idempotency
        reservations, removed = [], []
        for reservation_id in reservation_ids:
            found = self._live.get(reservation_id) or self._finished.get(reservation_id)
            if found is None:
                removed.append(reservation_id)
            else:
                reservations.append(found)
        entries, forgotten = [], []
        for scope in scopes:
            entry = self._idempotency.get(scope)
            if entry is None:
                forgotten.append(scope)
            else:
                entries.append(entry)
        delta = CheckpointDelta(
            self.partition,
            self.head_lsn,
            full,
            tuple((key, self._stock[key]) for key in keys),
            tuple(reservations),
            tuple(removed),
            tuple(entries),
            tuple(forgotten),
        )
        self._dirty = _Dirty()
        self._checkpoint_full_pending = False
        return delta

    def checkpoint_failed(self) -> None:
        """A delta was lost: the next checkpoint must write everything."""
        self._checkpoint_full_pending = True

    @classmethod
    def restore(
        cls,
        partition: int,
        lsn: int,
        stock: Iterable[tuple[InventoryKey, StockRow]],
        reservations: Iterable[Reservation],
        idempotency: Iterable[IdempotencyEntry],
    ) -> Partition:
        """Rebuild from a checkpoint; the ledger records after ``lsn`` are replayed next."""
        restored = cls(partition, lsn)
        restored._stock = dict(stock)
        # Live keeps finished reservations in the order they finished: by the lsn that
        # finished them, then by id within one record (see _expire).
        ordered = sorted(reservations, key=lambda r: (r.finished_lsn, r.reservation_id))
        for reservation in ordered:
            if reservation.state is ReservationState.ACTIVE:
                restored._put_live(reservation)
                for line in reservation.lines:
                    restored._holds.setdefault(line.key, {})[reservation.reservation_id] = (
                        line.quantity
                    )
            else:
                restored._finished[reservation.reservation_id] = reservation
        for holders in restored._holds.values():  # oldest first, as live apply keeps them
            ordered_ids = sorted(holders, key=lambda rid: restored._live[rid].created_lsn)
            holders_sorted = {rid: holders[rid] for rid in ordered_ids}
            holders.clear()
            holders.update(holders_sorted)
        for entry in sorted(idempotency, key=lambda e: e.lsn):  # live order: by lsn
            restored._idempotency[(entry.merchant_id, entry.idempotency_key)] = entry
        restored._dirty = _Dirty()
        restored._checkpoint_full_pending = False
        return restored

    def snapshot(self) -> PartitionSnapshot:
        reservations = {**self._finished, **self._live}
        return PartitionSnapshot(
            self.partition,
            self.head_lsn,
            dict(self._stock),
            reservations,
            dict(self._idempotency),
        )

    # ----------------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        """The full check, for tests after every step. Raises AssertionError."""
        held: dict[InventoryKey, int] = {}
        for reservation in self._live.values():
            assert reservation.state is ReservationState.ACTIVE, reservation
            for line in reservation.lines:
                assert line.quantity > 0, reservation
                held[line.key] = held.get(line.key, 0) + line.quantity
                holders = self._holds.get(line.key, {})
                assert holders.get(reservation.reservation_id) == line.quantity, reservation
        for key, row in self._stock.items():
            assert row.reserved == held.get(key, 0), (key, row, held.get(key, 0))
            assert row.reserved >= 0 and row.safety_stock >= 0, (key, row)
            assert row.version >= 1, (key, row)
        assert set(held) <= set(self._stock), "a reservation holds a key with no row"
        assert sum(len(h) for h in self._holds.values()) == sum(
            len(r.lines) for r in self._live.values()
        )
        for reservation in self._finished.values():
            assert reservation.state is not ReservationState.ACTIVE, reservation
        assert not set(self._live) & set(self._finished)
        assert len(self._live) <= limits.reservations_live_max
        assert len(self._idempotency) <= limits.idempotency_keys_max


def _invalid(field_name: str, reason: str) -> Outcome:
    return Invalid(field_name, reason)


def _expired_ids(record: Record) -> tuple[str, ...]:
    command = record.command
    return command.reservation_ids if isinstance(command, Expire) else ()
