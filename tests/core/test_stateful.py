"""The partition against a naive model, step by step (STYLE habits 5 and 8, DESIGN 2 and 6).

A ``RuleBasedStateMachine`` drives one ``Partition`` with every command (feeds included:
deltas and counts sent late, again and out of order, against online commits) over a small key
universe (one merchant, two locations, three SKUs) so that lines collide, with a simulated
clock that sometimes jumps past TTLs (expiry) and, rarely, past the 24 h retention. A plain
model (dicts and sorted lists, no heaps, no dirty sets) predicts every outcome and every
ledger record exactly. After every step:

- ``check_invariants`` holds on the live partition, on a replica built only by replaying the
  ledger (each record round-tripped through the codec and JSON), and on a partition restored
  from checkpoint deltas plus the ledger tail (which then also receives every live command);
- the model and the partition agree on every key's counts and version, every reservation and
  every idempotency entry, and on ``levels(keys, now)`` (reservations past expiry no longer
  count, timer or not);
- online operations never take available below zero when it was not already below zero,
  versions never decrease and increase whenever counts change, events chain before -> after,
  and head_lsn advances by exactly the number of records.

Hypothesis prints the failing steps and a reproduction blob (``print_blob=True``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from inventory_core import (
    TABLES,
    Accepted,
    AckStatus,
    AdjustmentReason,
    AdjustStock,
    CapacityExhausted,
    ChangeReason,
    ClientCommand,
    Command,
    Commit,
    Committed,
    EventAck,
    Expire,
    Expired,
    Extend,
    Extended,
    FeedEvent,
    FeedEventKind,
    IdempotencyEntry,
    IdempotencyKeyReused,
    Ingest,
    Ingested,
    InsufficientStock,
    Invalid,
    InventoryKey,
    Line,
    Outcome,
    OverCommit,
    OverCommitted,
    Partition,
    PartitionSnapshot,
    Record,
    Release,
    Released,
    Reservation,
    ReservationNotActive,
    ReservationNotFound,
    ReservationState,
    Reserve,
    Reserved,
    SetSafetyStock,
    SetStock,
    ShortLine,
    Step,
    StockChanged,
    StockLevel,
    StockRow,
    VersionMismatch,
    command_from_data,
    command_to_data,
    event_from_data,
    event_to_data,
    fingerprint,
    is_accepted,
    kind_of,
    limits,
    partition_of,
    reservation_id_for,
    validate_feed_event,
)

MERCHANT = "m1"
OTHER_MERCHANT = "m2"
LOCATIONS = ("l1", "l2")
SKUS = ("s1", "s2", "s3")
KEYS = tuple(InventoryKey(MERCHANT, sku, location) for location in LOCATIONS for sku in SKUS)
PARTITION = partition_of(MERCHANT, LOCATIONS[0])
START_MS = 1_700_000_000_000
DAY_PLUS_MS = 25 * 60 * 60 * 1000
TTL_S_RANGE = (30, 120)
ONLINE = (Reserve, Commit, Release, Extend, Expire)
FEED_REASONS = {ChangeReason(kind.value) for kind in FeedEventKind} | {ChangeReason.FEED}
DUPLICATE = EventAck(AckStatus.DUPLICATE)
SUPERSEDED = EventAck(AckStatus.SUPERSEDED)
REUSED = EventAck(AckStatus.REFUSED, "event_id")
SOURCES = ("pos-1", "pos-2")

REASON_OF: dict[type[Command], ChangeReason | None] = {
    Reserve: ChangeReason.RESERVATION,
    Commit: ChangeReason.COMMIT,
    Release: ChangeReason.RELEASE,
    Expire: ChangeReason.EXPIRY,
    Extend: None,
    SetStock: ChangeReason.SET_STOCK,
    SetSafetyStock: ChangeReason.SET_SAFETY_STOCK,
}


# ------------------------------------------------------------------------------ the model
#
# The specification, written plainly (DESIGN sections 2 and 6), not in the implementation's
# order: no running totals, no heaps, no indexes. reserved and available are recomputed from
# the list of reservations whenever they are asked for; the answers to retries are a list
# searched front to back; what is due and what is forgotten is found by scanning everything.


@dataclass
class Shelf:
    """What a key's counts are apart from reservations: the physical facts."""

    on_hand: int = 0
    safety_stock: int = 0
    # One per change of the key: each reservation line taken, committed, released or expired,
    # and each physical fact that moved on_hand or safety_stock.
    version: int = 0


@dataclass(frozen=True)
class Remembered:
    """An accepted mutation's answer, kept for retries."""

    merchant_id: str
    idempotency_key: str
    payload: ClientCommand  # the command with now_ms zeroed: retries compare equal
    outcome: Accepted
    lsn: int
    recorded_at_ms: int


@dataclass
class Answer:
    outcome: Outcome
    records: list[Command]
    retried: bool = False


@dataclass
class Model:
    shelves: dict[InventoryKey, Shelf] = field(default_factory=dict)
    # Every reservation not yet forgotten, in the order they were created.
    reservations: list[Reservation] = field(default_factory=list)
    answers: list[Remembered] = field(default_factory=list)
    head_lsn: int = 0
    # The feeds (DESIGN section 9), plainly: per key, the order of its last count and every
    # delta applied after it (a feed's or the service's own: commits, adjustments); and every
    # feed fact recorded, by (source, event_id), as (key, order, quantity, kind).
    last_count: dict[InventoryKey, tuple[int, str, str]] = field(default_factory=dict)
    after_count: dict[InventoryKey, list[tuple[tuple[int, str, str], int]]] = field(
        default_factory=dict
    )
    feed_facts: dict[tuple[str, str], tuple[InventoryKey, tuple[int, str, str], int, str]] = field(
        default_factory=dict
    )

    # ------------------------------------------------------------------------- reads

    def live(self) -> list[Reservation]:
        return [r for r in self.reservations if r.state is ReservationState.ACTIVE]

    def find(self, reservation_id: str) -> Reservation | None:
        return next((r for r in self.reservations if r.reservation_id == reservation_id), None)

    def reserved(self, key: InventoryKey, now_ms: int | None = None) -> int:
        """Units held on a key by live reservations (not yet due at now_ms, when given)."""
        return sum(
            line.quantity
            for r in self.live()
            if now_ms is None or r.expires_at_ms > now_ms
            for line in r.lines
            if line.key == key
        )

    def available(self, key: InventoryKey) -> int:
        shelf = self.shelves.get(key, Shelf())
        return shelf.on_hand - self.reserved(key) - shelf.safety_stock

    def level(self, key: InventoryKey, now_ms: int | None = None) -> StockLevel:
        shelf = self.shelves.get(key)
        if shelf is None:
            return StockLevel(key, 0, 0, 0, 0, exists=False)
        reserved = self.reserved(key, now_ms)
        return StockLevel(key, shelf.on_hand, reserved, shelf.safety_stock, shelf.version, True)

    def rows(self) -> dict[InventoryKey, list[int]]:
        return {
            key: [s.on_hand, self.reserved(key), s.safety_stock, s.version]
            for key, s in self.shelves.items()
        }

    def remembered(self, merchant_id: str, idempotency_key: str) -> Remembered | None:
        return next(
            (
                a
                for a in self.answers
                if (a.merchant_id, a.idempotency_key) == (merchant_id, idempotency_key)
            ),
            None,
        )

    # ------------------------------------------------------------------------ writes

    def apply(self, command: Command) -> Answer:
        now_ms = command.now_ms
        records: list[Command] = []
        # Anything due expires first, earliest first, in records of bounded size.
        due = sorted((r for r in self.live() if r.expires_at_ms <= now_ms), key=_expiry_order)
        due_ids = [r.reservation_id for r in due]
        batch_max = limits.expiry_batch_reservations_max
        for start in range(0, len(due_ids), batch_max):
            batch = tuple(due_ids[start : start + batch_max])
            lsn = self.head_lsn + 1
            for reservation_id in sorted(batch):
                self._finish(reservation_id, ReservationState.EXPIRED, lsn, now_ms, ())
            self._accept(Expire(batch, now_ms), records)
        if isinstance(command, Expire):
            return Answer(Expired(tuple(due_ids)), records)
        if isinstance(command, Ingest):
            lsn = self.head_lsn + 1
            outcome, kept = self._ingest(command, lsn)
            if kept:
                self._accept(replace(command, events=tuple(kept)), records)
            return Answer(outcome, records)
        payload = replace(command, now_ms=0)
        remembered = self.remembered(command.merchant_id, command.idempotency_key)
        if remembered is not None:
            if remembered.payload == payload:
                return Answer(remembered.outcome, records, retried=True)
            return Answer(
                IdempotencyKeyReused(command.idempotency_key, kind_of(remembered.payload)), records
            )
        if len(self.answers) >= limits.idempotency_keys_max:
            outcome: Outcome = CapacityExhausted(
                "idempotency_keys_max", limits.idempotency_keys_max
            )
            return Answer(outcome, records)
        lsn = self.head_lsn + 1
        outcome = self._decide(command, lsn)
        if is_accepted(outcome):
            self._accept(command, records)
            self.answers.append(
                Remembered(
                    command.merchant_id, command.idempotency_key, payload, outcome, lsn, now_ms
                )  # type: ignore[arg-type]
            )
        return Answer(outcome, records)

    def _accept(self, command: Command, records: list[Command]) -> None:
        """A record: the next lsn; then whatever is past its retention is forgotten."""
        self.head_lsn += 1
        records.append(command)
        answers_horizon_ms = command.now_ms - limits.idempotency_retention_ms
        self.answers = [a for a in self.answers if a.recorded_at_ms >= answers_horizon_ms]
        finished_horizon_ms = command.now_ms - limits.reservations_finished_retention_ms
        finished = sorted(
            (r for r in self.reservations if r.state is not ReservationState.ACTIVE),
            key=lambda r: (r.finished_lsn, r.reservation_id),
        )
        kept = finished[-limits.reservations_finished_max :]
        forgotten = {
            r.reservation_id
            for r in finished
            if r not in kept or r.state_changed_at_ms < finished_horizon_ms
        }
        self.reservations = [r for r in self.reservations if r.reservation_id not in forgotten]

    def _decide(self, command: ClientCommand, lsn: int) -> Outcome:
        match command:
            case Reserve():
                return self._reserve(command, lsn)
            case Commit() | Release() | Extend():
                found = self.find(command.reservation_id)
                if found is None or found.merchant_id != command.merchant_id:
                    return ReservationNotFound(command.reservation_id)
                if found.state is not ReservationState.ACTIVE:
                    return ReservationNotActive(
                        command.reservation_id, found.state, found.state_changed_at_ms
                    )
                if isinstance(command, Commit):
                    return self._commit(command, found, lsn)
                if isinstance(command, Release):
                    done = self._finish(
                        found.reservation_id, ReservationState.RELEASED, lsn, command.now_ms, ()
                    )
                    return Released(done, tuple(self.level(line.key) for line in found.lines))
                extended = replace(found, expires_at_ms=command.now_ms + command.ttl_s * 1000)
                self._replace(extended)
                return Extended(extended)
            case AdjustStock() | SetStock() | SetSafetyStock():
                return self._set_counts(command, lsn)

    def _reserve(self, command: Reserve, lsn: int) -> Outcome:
        if len(self.live()) >= limits.reservations_live_max:
            return CapacityExhausted("reservations_live_max", limits.reservations_live_max)
        wanted: dict[InventoryKey, int] = {}
        for line in command.lines:
            wanted[line.key] = wanted.get(line.key, 0) + line.quantity
        if any(quantity > self.available(key) for key, quantity in wanted.items()):
            return InsufficientStock(
                tuple(ShortLine(k, q, max(self.available(k), 0)) for k, q in wanted.items())
            )
        ttl_s = command.ttl_s or limits.reservation_ttl_s_default
        first = command.lines[0].key
        reservation = Reservation(
            reservation_id=reservation_id_for(PARTITION, lsn),
            merchant_id=first.merchant_id,
            location_id=first.location_id,
            lines=tuple(Line(k, q) for k, q in wanted.items()),
            state=ReservationState.ACTIVE,
            created_at_ms=command.now_ms,
            expires_at_ms=command.now_ms + ttl_s * 1000,
            state_changed_at_ms=command.now_ms,
            created_lsn=lsn,
        )
        self.reservations.append(reservation)
        for key in wanted:
            self.shelves[key].version += 1
        return Reserved(reservation, tuple(self.level(key) for key in wanted))

    def _commit(self, command: Commit, found: Reservation, lsn: int) -> Outcome:
        held = {line.key: line.quantity for line in found.lines}
        taken = dict(held) if not command.lines else dict.fromkeys(held, 0)
        for index, line in enumerate(command.lines):
            if line.key not in held:
                return Invalid(f"lines[{index}].key", "")
            if line.quantity > held[line.key]:
                return Invalid(f"lines[{index}].quantity", "")
            taken[line.key] = line.quantity
        for key, quantity in taken.items():
            if quantity:
                self.shelves[key].on_hand += self._own_delta(key, -quantity, command.now_ms, lsn)
        committed = tuple(Line(k, q) for k, q in taken.items() if q > 0)
        done = self._finish(
            found.reservation_id, ReservationState.COMMITTED, lsn, command.now_ms, committed
        )
        return Committed(done, tuple(self.level(key) for key in held))

    def _set_counts(self, command: AdjustStock | SetStock | SetSafetyStock, lsn: int) -> Outcome:
        key = command.key
        shelf = self.shelves.get(key)
        current = shelf or Shelf()
        on_hand, safety_stock = current.on_hand, current.safety_stock
        expected: int | None = None
        own = (command.now_ms, "", f"{lsn:012d}")
        match command:
            case AdjustStock():
                if abs(on_hand + command.delta) > limits.stock_quantity_max:
                    return Invalid("delta", "")
                if self.covered(key, own):
                    return StockChanged(self.level(key), self.over_commit(key), superseded=True)
                on_hand += self._own_delta(key, command.delta, command.now_ms, lsn)
            case SetStock():
                expected = command.expected_version
                if expected is not None and expected != current.version:
                    return VersionMismatch(key, expected, current.version)
                if self.covered(key, own):
                    return StockChanged(self.level(key), self.over_commit(key), superseded=True)
                on_hand = self._count(key, own, command.on_hand)
            case SetSafetyStock():
                safety_stock, expected = command.safety_stock, command.expected_version
        if expected is not None and expected != current.version:
            return VersionMismatch(key, expected, current.version)
        if shelf is None or (shelf.on_hand, shelf.safety_stock) != (on_hand, safety_stock):
            self.shelves[key] = Shelf(on_hand, safety_stock, current.version + 1)
        return StockChanged(self.level(key), self.over_commit(key))

    # --------------------------------------------------------------------- the feeds

    def covered(self, key: InventoryKey, order: tuple[int, str, str]) -> bool:
        """A fact at or before the key's last count: the count already includes it."""
        return key in self.last_count and order <= self.last_count[key]

    def _own_delta(self, key: InventoryKey, delta: int, now_ms: int, lsn: int) -> int:
        order = (now_ms, "", f"{lsn:012d}")
        if self.covered(key, order):
            return 0
        self.after_count.setdefault(key, []).append((order, delta))
        return delta

    def _count(self, key: InventoryKey, order: tuple[int, str, str], value: int) -> int:
        """A count applied: its value plus the deltas applied that occurred after it."""
        later = [(o, q) for o, q in self.after_count.get(key, []) if o > order]
        self.after_count[key] = later
        self.last_count[key] = order
        for fact_id, (fact_key, fact_order, _, _) in list(self.feed_facts.items()):
            if fact_key == key and fact_order <= order:
                del self.feed_facts[fact_id]
        return value + sum(q for _, q in later)

    def _ingest(self, command: Ingest, lsn: int) -> tuple[Ingested, list[FeedEvent]]:
        """Each item judged on its own, in order (the table of inventory_core/_history.py,
        written out plainly); one change per key at the end."""
        now_ms = command.now_ms
        horizon_ms = now_ms - limits.feed_history_retention_ms
        acks: list[EventAck] = []
        kept: list[FeedEvent] = []
        moved: dict[InventoryKey, int] = {}  # key -> events applied to it
        judged: list[InventoryKey] = []
        on_hand: dict[InventoryKey, int] = {}
        for item in command.events:
            problem = validate_feed_event(item, command.merchant_id, PARTITION, now_ms)
            if problem is not None:
                acks.append(EventAck(AckStatus.REFUSED, problem.field, problem.reason))
                continue
            assert item.kind is not None
            key = item.key
            if key not in judged:
                judged.append(key)
                on_hand[key] = self.shelves[key].on_hand if key in self.shelves else 0
            order = (item.occurred_at_ms, command.source, item.event_id)
            is_count = item.kind is FeedEventKind.COUNT
            quantity = item.count if is_count else item.quantity * item.kind.sign
            assert quantity is not None
            fact = (key, order, quantity, item.kind.value)
            found = self.feed_facts.get((command.source, item.event_id))
            if found is not None and found[1][0] < horizon_ms and found[3] != "count":
                found = None  # a delta that left its window is forgotten
            covered = self.covered(key, order)
            outside = item.occurred_at_ms < horizon_ms
            ack: EventAck | None = None
            if is_count:
                if found is not None:
                    same = found[0] == key and found[1:] == fact[1:]
                    ack = DUPLICATE if same else REUSED
                elif covered or outside:
                    ack = SUPERSEDED
            elif covered:
                ack = SUPERSEDED
            elif outside:
                ack = EventAck(AckStatus.REFUSED, "occurred_at_ms", "")
            elif found is not None:
                ack = DUPLICATE if found[0] == key and found[1:] == fact[1:] else REUSED
            if ack is not None:
                acks.append(ack)
                if ack is SUPERSEDED:
                    kept.append(item)
                continue
            if is_count:
                on_hand[key] = self._count(key, order, quantity)
            else:
                on_hand[key] += quantity
                self.after_count.setdefault(key, []).append((order, quantity))
            self.feed_facts[(command.source, item.event_id)] = fact
            moved[key] = moved.get(key, 0) + 1
            acks.append(EventAck(AckStatus.APPLIED))
            kept.append(item)
        if not kept:
            return Ingested(tuple(acks)), kept
        for key in moved:
            shelf = self.shelves.get(key)
            if shelf is None:
                self.shelves[key] = Shelf(on_hand[key], 0, 1)
            elif shelf.on_hand != on_hand[key]:
                shelf.on_hand, shelf.version = on_hand[key], shelf.version + 1
        recorded = list(dict.fromkeys(e.key for e in kept))  # by first recorded event
        over = [OverCommitted(k, o) for k in recorded if (o := self.over_commit(k)) is not None]
        return Ingested(tuple(acks), tuple(over)), kept

    def over_commit(self, key: InventoryKey) -> OverCommit | None:
        """How far available is below zero, and the newest live reservations on the key
        until they cover it."""
        exposure = -self.available(key)
        if exposure <= 0:
            return None
        holding = [r for r in self.live() if any(line.key == key for line in r.lines)]
        holding.sort(key=lambda r: r.created_lsn, reverse=True)
        at_risk: list[str] = []
        covered = 0
        for reservation in holding:
            if covered >= exposure:
                break
            at_risk.append(reservation.reservation_id)
            covered += sum(line.quantity for line in reservation.lines if line.key == key)
        return OverCommit(exposure, tuple(at_risk))

    def _finish(
        self,
        reservation_id: str,
        state: ReservationState,
        lsn: int,
        now_ms: int,
        committed: tuple[Line, ...],
    ) -> Reservation:
        found = self.find(reservation_id)
        assert found is not None
        done = replace(
            found,
            state=state,
            state_changed_at_ms=now_ms,
            committed_lines=committed,
            finished_lsn=lsn,
        )
        self._replace(done)
        for line in found.lines:  # each line held is one change of its key
            self.shelves[line.key].version += 1
        return done

    def _replace(self, reservation: Reservation) -> None:
        self.reservations = [
            reservation if r.reservation_id == reservation.reservation_id else r
            for r in self.reservations
        ]


def _expiry_order(reservation: Reservation) -> tuple[int, str]:
    return (reservation.expires_at_ms, reservation.reservation_id)


# ------------------------------------------------------------------------ codec helpers


def through_ledger(record: Record) -> Record:
    """A record as the ledger gives it back: command -> data -> JSON -> data -> command."""
    data = json.loads(json.dumps(command_to_data(record.command)))
    command = command_from_data(data)
    assert command == record.command, (command, record.command)
    return Record(record.partition, record.lsn, command)


def replay_all(records: list[Record]) -> Partition:
    replica = Partition(PARTITION)
    for record in records:
        replica.replay(through_ledger(record))
    return replica


@dataclass
class Checkpointed:
    """Accumulated checkpoint deltas as a store holds them: per table, plain data by key."""

    lsn: int = 0
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)


def roundtrip(data: Any) -> Any:
    return json.loads(json.dumps(data))


# ------------------------------------------------------------------------ the machine


def counts(row: StockRow) -> tuple[int, int, int]:
    return (row.on_hand, row.reserved, row.safety_stock)


class PartitionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.partition = Partition(PARTITION)
        self.model = Model()
        self.replica = Partition(PARTITION)  # built only by replaying the ledger
        self.shadow: Partition | None = None  # restored from checkpoints, then fed live commands
        self.now_ms = START_MS
        self.records: list[Record] = []
        self.history: list[ClientCommand] = []
        self.reservation_ids: list[str] = []
        # Every expires_at_ms pushed for a reservation: see extend_ttl_choices.
        self.expiries_pushed: dict[str, set[int]] = {}
        self.checkpointed: Checkpointed | None = None
        self.next_key = 0
        self.steps = 0
        self.sent_events: list[FeedEvent] = []
        self.next_event = 0

    # ------------------------------------------------------------------------ helpers

    def fresh_idempotency_key(self) -> str:
        self.next_key += 1
        return f"idem-{self.next_key}"

    def do(self, command: Command) -> Step:
        """Apply to the partition, the model and the shadow; check the step."""
        before = self.partition.snapshot()
        if isinstance(command, Expire):
            step = self.partition.expire_due(command.now_ms)
        else:
            step = self.partition.apply(command)
        after = self.partition.snapshot()
        answer = self.model.apply(command)
        event(f"{kind_of(command)} -> {type(step.outcome).__name__}")
        if isinstance(step.outcome, StockChanged) and step.outcome.over_commit is not None:
            event("over-commit")
        if len(step.records) > 1 or (step.records and not isinstance(command, Expire)):
            event(f"{len(step.records)} records")

        if isinstance(answer.outcome, Invalid):
            assert isinstance(step.outcome, Invalid), step.outcome
            assert step.outcome.field == answer.outcome.field, step.outcome
        elif isinstance(answer.outcome, Ingested):
            assert isinstance(step.outcome, Ingested), step.outcome
            got = [(a.status, a.field) for a in step.outcome.acks]
            assert got == [(a.status, a.field) for a in answer.outcome.acks], step.outcome
            assert step.outcome.over_committed == answer.outcome.over_committed
            for ack in step.outcome.acks:
                event(f"ingest: {ack.status.value}")
        else:
            assert step.outcome == answer.outcome, (step.outcome, answer.outcome)
        assert [r.command for r in step.records] == answer.records, step.records
        if answer.retried:
            event("retry answered from idempotency")
            # Same key, same payload: the original answer, and no new record for it.
            assert all(isinstance(r.command, Expire) for r in step.records)

        # Records: consecutive lsns in this partition, head_lsn moves by their number.
        lsns = [r.lsn for r in step.records]
        assert lsns == list(range(before.head_lsn + 1, before.head_lsn + 1 + len(lsns)))
        assert all(r.partition == PARTITION for r in step.records)
        assert after.head_lsn == before.head_lsn + len(step.records)
        assert self.partition.head_lsn == after.head_lsn

        self.check_events(step, before, after)
        self.check_versions(before, after)
        if isinstance(command, ONLINE):
            self.check_online_keeps_available(before, after)

        for record in step.records:
            self.records.append(record)
            events = self.replica.replay(through_ledger(record))
            assert events == tuple(e for e in step.events if e.lsn == record.lsn)
        if self.shadow is not None:
            shadow_step = (
                self.shadow.expire_due(command.now_ms)
                if isinstance(command, Expire)
                else self.shadow.apply(command)
            )
            assert shadow_step == step, (shadow_step, step)

        if not isinstance(command, Expire | Ingest):
            self.history.append(command)
        if isinstance(step.outcome, Reserved | Extended):
            reservation = step.outcome.reservation
            if isinstance(step.outcome, Reserved):
                self.reservation_ids.append(reservation.reservation_id)
            pushed = self.expiries_pushed.setdefault(reservation.reservation_id, set())
            pushed.add(reservation.expires_at_ms)
        return step

    def check_events(self, step: Step, before: PartitionSnapshot, after: PartitionSnapshot) -> None:
        """Every change is an event; chaining before -> after from the old state gives the new."""
        commands = {r.lsn: r.command for r in step.records}
        stock = dict(before.stock)
        for change in step.events:
            command = commands[change.lsn]
            if isinstance(command, Ingest):
                assert change.reason in FEED_REASONS, (change, command)
            else:
                expected_reason = (
                    ChangeReason(command.reason.value)
                    if isinstance(command, AdjustStock)
                    else REASON_OF[type(command)]
                )
                assert change.reason == expected_reason, (change, command)
            assert change.partition == PARTITION
            assert change.recorded_at_ms == command.now_ms
            assert change.before == stock.get(change.key, StockRow())
            assert change.after.version == change.before.version + 1
            assert change.version == change.after.version
            data = json.loads(json.dumps(event_to_data(change)))
            assert event_from_data(data, change.partition, change.lsn) == change
            stock[change.key] = change.after
        assert stock == after.stock

    def check_versions(self, before: PartitionSnapshot, after: PartitionSnapshot) -> None:
        assert set(before.stock) <= set(after.stock), "a key disappeared"
        for key, old in before.stock.items():
            new = after.stock[key]
            assert new.version >= old.version, (key, old, new)
            if counts(new) != counts(old):
                assert new.version > old.version, (key, old, new)

    def check_online_keeps_available(
        self, before: PartitionSnapshot, after: PartitionSnapshot
    ) -> None:
        assert set(after.stock) == set(before.stock), "an online operation created a key"
        for key, old in before.stock.items():
            if old.available >= 0:
                assert after.stock[key].available >= 0, (key, old, after.stock[key])

    def draw_lines_for(self, data: st.DataObject, reservation_id: str) -> tuple[Line, ...]:
        """Whole (no lines), partial, or a line the reservation does not hold."""
        found = self.model.find(reservation_id)
        if found is None or data.draw(st.booleans(), label="whole"):
            return ()
        lines = []
        for line in found.lines:
            if data.draw(st.booleans(), label="keep line"):
                quantity = data.draw(st.integers(0, line.quantity), label="quantity")
                lines.append(Line(line.key, quantity))
        wrong = data.draw(st.integers(0, 9), label="wrong")
        if wrong == 0:
            held = {line.key for line in found.lines}
            others = [key for key in KEYS if key not in held]
            if others:
                lines.append(Line(data.draw(st.sampled_from(others)), 1))
        elif wrong == 1:
            extra = found.lines[0]
            lines = [line for line in lines if line.key != extra.key]
            lines.append(Line(extra.key, extra.quantity + 1))
        return tuple(lines)

    def draw_reservation_id(self, data: st.DataObject) -> str:
        unknown = reservation_id_for(PARTITION, 9_999_999)
        return data.draw(st.sampled_from([*self.reservation_ids, unknown]), label="reservation")

    def draw_merchant(self, data: st.DataObject) -> str:
        other = data.draw(st.integers(0, 9), label="other merchant") == 0
        return OTHER_MERCHANT if other else MERCHANT

    def extend_ttl_choices(self, reservation_id: str) -> list[int]:
        """Every TTL, including ones whose expiry was pushed for this reservation before.

        (Re-pushing an expiry once made ``levels`` count a due reservation twice: pinned by
        test_rules.py::test_extend_to_an_expiry_already_pushed_does_not_double_count_in_reads.)
        """
        low, high = TTL_S_RANGE
        return list(range(low, high + 1))

    # -------------------------------------------------------------------------- rules

    @initialize(stock=st.lists(st.integers(0, 12), min_size=len(KEYS), max_size=len(KEYS)))
    def stock_every_key(self, stock: list[int]) -> None:
        """Start with shelves mostly stocked, so that reserves are often admitted."""
        for key, on_hand in zip(KEYS, stock, strict=True):
            self.do(SetStock(key, self.fresh_idempotency_key(), on_hand, None, self.now_ms))

    @rule(data=st.data())
    def advance_clock(self, data: st.DataObject) -> None:
        size = data.draw(st.integers(0, 99), label="size")
        # Whole seconds mostly, so that expiries of different reservations coincide.
        if size < 10:
            step_ms = data.draw(st.integers(0, 999), label="ms")
        elif size < 55:
            step_ms = 1000 * data.draw(st.integers(0, 3), label="s")
        elif size < 80:
            step_ms = 1000 * data.draw(st.integers(3, 60), label="s")
        elif size < 98:
            step_ms = 1000 * data.draw(st.integers(60, 300), label="s")  # past TTLs
        else:
            step_ms = DAY_PLUS_MS  # past idempotency and finished-reservation retention
        self.now_ms += step_ms

    @rule(data=st.data())
    def reserve(self, data: st.DataObject) -> None:
        location = data.draw(st.sampled_from(LOCATIONS), label="location")
        count = data.draw(st.integers(1, 4), label="lines")
        lines: list[Line] = []
        for _ in range(count):
            if lines and data.draw(st.integers(0, 3), label="same key") == 0:
                key = data.draw(st.sampled_from(lines)).key
            else:
                sku = data.draw(st.sampled_from(SKUS), label="sku")
                key = InventoryKey(MERCHANT, sku, location)
            lines.append(Line(key, data.draw(st.integers(1, 5), label="quantity")))
        ttl_s = data.draw(st.one_of(st.just(0), st.integers(*TTL_S_RANGE)), label="ttl_s")
        idempotency_key = self.fresh_idempotency_key()
        self.do(Reserve(MERCHANT, idempotency_key, tuple(lines), ttl_s, self.now_ms))

    @precondition(lambda self: bool(self.reservation_ids))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        reservation_id = self.draw_reservation_id(data)
        lines = self.draw_lines_for(data, reservation_id)
        merchant = self.draw_merchant(data)
        key = self.fresh_idempotency_key()
        self.do(Commit(merchant, key, reservation_id, lines, self.now_ms))

    @precondition(lambda self: bool(self.reservation_ids))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        reservation_id = self.draw_reservation_id(data)
        merchant = self.draw_merchant(data)
        self.do(Release(merchant, self.fresh_idempotency_key(), reservation_id, self.now_ms))

    @precondition(lambda self: bool(self.reservation_ids))
    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        reservation_id = self.draw_reservation_id(data)
        choices = self.extend_ttl_choices(reservation_id)
        ttl_s = data.draw(st.sampled_from(choices), label="ttl")
        found = self.model.find(reservation_id)
        live = found is not None and found.state is ReservationState.ACTIVE
        if found is not None and live and data.draw(st.integers(0, 3), label="same expiry") == 0:
            # Renew to the very expiry it already has (a client re-sending its deadline).
            same_ttl_s, rest = divmod(found.expires_at_ms - self.now_ms, 1000)
            if rest == 0 and same_ttl_s in choices:
                ttl_s = same_ttl_s
        merchant = self.draw_merchant(data)
        key = self.fresh_idempotency_key()
        self.do(Extend(merchant, key, reservation_id, ttl_s, self.now_ms))

    @rule(
        key=st.sampled_from(KEYS),
        size=st.integers(1, 8),
        negative=st.booleans(),
        reason=st.sampled_from(AdjustmentReason),
        late_ms=st.integers(0, 10_000),
    )
    def adjust(
        self,
        key: InventoryKey,
        size: int,
        negative: bool,
        reason: AdjustmentReason,
        late_ms: int,
    ) -> None:
        delta = -size if negative else size
        occurred_at_ms = self.now_ms - late_ms
        command = AdjustStock(
            key, self.fresh_idempotency_key(), delta, reason, occurred_at_ms, self.now_ms
        )
        self.do(command)

    def draw_expected_version(self, data: st.DataObject, key: InventoryKey) -> int | None:
        current = self.model.level(key).version
        choice = data.draw(st.sampled_from(["none", "current", "stale", "ahead"]), label="cas")
        if choice == "none":
            return None
        if choice == "current":
            return current
        if choice == "stale":
            return max(current - 1, 0) if current else 3
        return current + 1

    @rule(data=st.data(), key=st.sampled_from(KEYS), on_hand=st.integers(0, 12))
    def set_stock(self, data: st.DataObject, key: InventoryKey, on_hand: int) -> None:
        expected = self.draw_expected_version(data, key)
        command = SetStock(key, self.fresh_idempotency_key(), on_hand, expected, self.now_ms)
        step = self.do(command)
        if isinstance(step.outcome, VersionMismatch):
            assert step.outcome.current_version == self.model.level(key).version

    @rule(data=st.data(), key=st.sampled_from(KEYS), safety_stock=st.integers(0, 4))
    def set_safety_stock(self, data: st.DataObject, key: InventoryKey, safety_stock: int) -> None:
        expected = self.draw_expected_version(data, key)
        idempotency_key = self.fresh_idempotency_key()
        self.do(SetSafetyStock(key, idempotency_key, safety_stock, expected, self.now_ms))

    @rule(data=st.data())
    def ingest(self, data: st.DataObject) -> None:
        """A gateway's batch: new events, events sent before (again, or altered: the same id
        for another event), and now and then a bad one; deltas and counts, some late."""
        events: list[FeedEvent] = []
        for _ in range(data.draw(st.integers(1, 4), label="events")):
            choice = data.draw(st.integers(0, 9), label="which")
            if self.sent_events and choice < 3:
                event = data.draw(st.sampled_from(self.sent_events), label="again")
                if choice == 0:
                    event = replace(event, reason="altered", quantity=event.quantity + 1)
            elif choice == 3:
                bad = FeedEvent(f"ev-{self.next_event}", FeedEventKind.COUNT, KEYS[0], self.now_ms)
                event = data.draw(
                    st.sampled_from(
                        [bad, replace(bad, count=-1), replace(bad, kind=None, count=2)]
                    ),
                    label="bad",
                )
            else:
                self.next_event += 1
                kind = data.draw(st.sampled_from(FeedEventKind), label="kind")
                late_ms = data.draw(st.integers(-2_000, 30_000), label="late_ms")
                event = FeedEvent(
                    f"ev-{self.next_event}",
                    kind,
                    data.draw(st.sampled_from(KEYS), label="key"),
                    self.now_ms - late_ms,
                    quantity=0 if kind.is_count else data.draw(st.integers(1, 4), label="q"),
                    count=data.draw(st.integers(0, 12), label="count") if kind.is_count else None,
                )
            events.append(event)
        source = data.draw(st.sampled_from(SOURCES), label="source")
        self.do(Ingest(MERCHANT, source, tuple(events), self.now_ms))
        self.sent_events.extend(e for e in events if e.kind is not None and e.count != -1)

    @rule()
    def expire_due(self) -> None:
        step = self.do(Expire((), self.now_ms))
        assert isinstance(step.outcome, Expired)
        assert all(isinstance(r.command, Expire) for r in step.records)
        assert step.outcome.reservation_ids == tuple(
            i
            for r in step.records
            if isinstance(r.command, Expire)
            for i in r.command.reservation_ids
        )

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        original = data.draw(st.sampled_from(self.history), label="original")
        same_payload = data.draw(st.booleans(), label="same payload")
        command = replace(original, now_ms=self.now_ms)
        if not same_payload:
            command = other_payload(command)
        pushes_twice = isinstance(command, Extend) and (
            command.ttl_s not in self.extend_ttl_choices(command.reservation_id)
        )
        if pushes_twice:
            return  # would push an expiry twice; see extend_ttl_choices
        remembered_before = self.model.remembered(command.merchant_id, command.idempotency_key)
        step = self.do(command)
        remembered = self.model.remembered(command.merchant_id, command.idempotency_key)
        if remembered is not None and remembered is remembered_before:
            if remembered.payload == replace(command, now_ms=0):
                assert step.outcome == remembered.outcome
                assert all(isinstance(r.command, Expire) for r in step.records)
            else:
                assert isinstance(step.outcome, IdempotencyKeyReused), step.outcome
                assert step.outcome.original_kind == kind_of(remembered.payload)

    @rule(data=st.data())
    def invalid(self, data: st.DataObject) -> None:
        fresh = self.fresh_idempotency_key()
        now = self.now_ms
        key = KEYS[0]
        rid = self.reservation_ids[-1] if self.reservation_ids else "r0000-0000000001"
        candidates: list[Command] = [
            Reserve(MERCHANT, fresh, (Line(key, 0),), 60, now),
            Reserve(MERCHANT, fresh, (), 60, now),
            Reserve(MERCHANT, fresh, (Line(InventoryKey("bad id", "s1", "l1"), 1),), 60, now),
            Reserve(MERCHANT, fresh, (Line(key, 1), Line(KEYS[3], 1)), 60, now),
            Reserve(MERCHANT, fresh, (Line(key, 1),), limits.reservation_ttl_s_min - 1, now),
            Reserve(MERCHANT, "", (Line(key, 1),), 60, now),
            Commit(MERCHANT, fresh, "", (), now),
            Commit(MERCHANT, fresh, rid, (Line(key, 1), Line(key, 1)), now),
            Commit("", fresh, rid, (), now),
            Release(MERCHANT, fresh, "x" * (limits.identifier_length_max + 1), now),
            Extend(MERCHANT, fresh, rid, 0, now),
            Extend(MERCHANT, fresh, rid, limits.reservation_ttl_s_max + 1, now),
            AdjustStock(key, fresh, 0, AdjustmentReason.SALE, now, now),
            AdjustStock(key, fresh, 1, AdjustmentReason.SALE, -1, now),
            SetStock(key, fresh, -1, None, now),
            SetStock(key, fresh, 1, -1, now),
            SetSafetyStock(key, fresh, -1, None, now),
            SetSafetyStock(InventoryKey(MERCHANT, "", "l1"), fresh, 1, None, now),
        ]
        command = data.draw(st.sampled_from(candidates), label="invalid command")
        before = self.partition.snapshot()
        step = self.partition.apply(command)
        assert isinstance(step.outcome, Invalid), step.outcome
        assert step.records == () and step.events == ()
        assert self.partition.snapshot() == before
        if self.shadow is not None:
            assert self.shadow.apply(command) == step

    @rule(lose=st.integers(0, 4))
    def take_checkpoint(self, lose: int) -> None:
        delta = self.partition.take_checkpoint()
        assert delta.partition == PARTITION and delta.lsn == self.partition.head_lsn
        assert set(delta.tables) == set(TABLES)
        if lose == 0:  # the upsert failed: the next checkpoint must carry everything
            self.partition.checkpoint_failed()
            return
        if delta.full:
            self.checkpointed = Checkpointed()
        checkpointed = self.checkpointed
        assert checkpointed is not None, "an incremental delta without a full one before it"
        checkpointed.lsn = delta.lsn
        for name, changes in delta.tables.items():
            schema = TABLES[name]
            rows = checkpointed.tables.setdefault(name, {})
            for key, row in changes.upserts:
                rows[json.dumps(schema.key_to_data(key))] = roundtrip(schema.row_to_data(row))
            for key in changes.removals:
                # Created and forgotten between two checkpoints: deleting nothing is fine.
                rows.pop(json.dumps(schema.key_to_data(key)), None)

    def restore(self) -> Partition:
        checkpointed = self.checkpointed
        assert checkpointed is not None
        restored = Partition.restore(
            PARTITION,
            checkpointed.lsn,
            {
                name: [
                    (TABLES[name].key_from_data(json.loads(k)), TABLES[name].row_from_data(v))
                    for k, v in rows.items()
                ]
                for name, rows in checkpointed.tables.items()
            },
        )
        for record in self.records[checkpointed.lsn :]:
            restored.replay(through_ledger(record))
        restored.check_invariants()
        assert restored.snapshot() == self.partition.snapshot()
        return restored

    @precondition(lambda self: self.checkpointed is not None)
    @rule()
    def restore_from_checkpoints(self) -> None:
        """Checkpoint deltas plus the ledger after their lsn equal live; it then runs on."""
        self.shadow = self.restore()

    # --------------------------------------------------------------------- invariants

    @invariant()
    def core_invariants_hold(self) -> None:
        self.partition.check_invariants()
        self.replica.check_invariants()
        if self.shadow is not None:
            self.shadow.check_invariants()

    @invariant()
    def model_agrees(self) -> None:
        snapshot = self.partition.snapshot()
        model = self.model
        assert snapshot.head_lsn == model.head_lsn == len(self.records)
        assert {
            k: [r.on_hand, r.reserved, r.safety_stock, r.version] for k, r in snapshot.stock.items()
        } == model.rows()
        assert snapshot.reservations == {r.reservation_id: r for r in model.reservations}
        expected_idempotency = {
            (a.merchant_id, a.idempotency_key): IdempotencyEntry(
                a.merchant_id,
                a.idempotency_key,
                kind_of(a.payload),
                fingerprint(a.payload),
                a.outcome,
                a.lsn,
                a.recorded_at_ms,
            )
            for a in model.answers
        }
        assert snapshot.idempotency == expected_idempotency
        assert self.partition.live_reservation_count == len(model.live())
        assert self.partition.key_count == len(model.shelves)
        over = {key: -model.available(key) for key in model.shelves if model.available(key) < 0}
        assert self.partition.over_committed() == over

    @invariant()
    def reads_agree(self) -> None:
        """levels(keys, now): reservations past expiry no longer count, timer or not."""
        expected = tuple(self.model.level(key, self.now_ms) for key in KEYS)
        assert self.partition.levels(KEYS, self.now_ms) == expected
        assert self.replica.levels(KEYS, self.now_ms) == expected
        if self.shadow is not None:
            assert self.shadow.levels(KEYS, self.now_ms) == expected
        for level in expected:
            assert level.reserved >= 0
        for reservation_id in self.reservation_ids[-3:]:
            found = self.partition.reservation(MERCHANT, reservation_id, self.now_ms)
            known = self.model.find(reservation_id)
            if known is None:
                assert found is None
                continue
            assert found is not None
            if known.state is ReservationState.ACTIVE and known.expires_at_ms <= self.now_ms:
                assert found.state is ReservationState.EXPIRED
            else:
                assert found == known
            assert self.partition.reservation(OTHER_MERCHANT, reservation_id, self.now_ms) is None

    @invariant()
    def reserved_is_the_sum_of_live_lines(self) -> None:
        snapshot = self.partition.snapshot()
        held: dict[InventoryKey, int] = {}
        for reservation in snapshot.reservations.values():
            if reservation.state is ReservationState.ACTIVE:
                for line in reservation.lines:
                    held[line.key] = held.get(line.key, 0) + line.quantity
        for key, row in snapshot.stock.items():
            assert row.reserved == held.pop(key, 0), key
        assert not held

    @invariant()
    def replay_equals_live(self) -> None:
        snapshot = self.partition.snapshot()
        assert self.replica.snapshot() == snapshot
        if self.shadow is not None:
            assert self.shadow.snapshot() == snapshot
        self.steps += 1
        if self.steps % 20 == 0:  # and now and then from empty, through the codec
            assert replay_all(self.records).snapshot() == snapshot

    def teardown(self) -> None:
        snapshot = self.partition.snapshot()
        assert replay_all(self.records).snapshot() == snapshot
        if self.checkpointed is not None:
            self.restore()


def other_payload(command: ClientCommand) -> ClientCommand:
    """The same idempotency key with a different, still valid payload."""
    match command:
        case Reserve():
            low, high = TTL_S_RANGE
            return replace(command, ttl_s=high if command.ttl_s != high else low)
        case Commit() | Release():
            return replace(command, reservation_id=command.reservation_id + "x")
        case Extend():
            return replace(command, ttl_s=command.ttl_s + 1 if command.ttl_s < 120 else 30)
        case AdjustStock():
            return replace(command, delta=command.delta + 1 if command.delta != -1 else -2)
        case SetStock():
            return replace(command, on_hand=command.on_hand + 1)
        case SetSafetyStock():
            return replace(command, safety_stock=command.safety_stock + 1)


PartitionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPartitionAgainstModel = PartitionMachine.TestCase
