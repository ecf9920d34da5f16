"""Feeds: sales at the till, returns, receipts, adjustments and counts (DESIGN section 9).

A POS gateway or a supplier integration sends events late, duplicated and out of order.
Each event of an ``Ingest`` is judged on its own, in the command's order, against its key's
history as the events before it left it (the rules are in ``_history.py``): refused (its
field and reason), duplicate, superseded, or applied. A bad event is refused alone; the
rest of the batch goes on. Physical facts always apply, even when they take available below
zero (DESIGN section 2): the answer lists every key of the batch left over-committed, with
the live reservations at risk, newest first.

All changes of one key in one record make one change of its row: one version, one event,
whose reason is the event's kind (or ``feed`` when several events moved the key). The
service's own physical facts (a commit, ``AdjustStock``, ``SetStock``) go through
``own_delta`` and ``own_count`` here, so that a late count accounts for them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import _history as history_rules
from .. import _limits as limits
from .. import _validate
from .._commands import FeedEvent, Ingest
from .._history import EMPTY_HISTORY, OWN_SOURCE, Fact, KeyHistory
from .._model import ChangeReason, FeedEventKind, FeedLocation, InventoryKey, StockRow, partition_of
from .._outcomes import AckStatus, CapacityExhausted, EventAck, Ingested, Invalid, OverCommitted
from .._state import Effects, PartitionState
from . import deliveries, staleness

APPLIED = EventAck(AckStatus.APPLIED)
DUPLICATE = EventAck(AckStatus.DUPLICATE)
RECORDED = frozenset({AckStatus.APPLIED, AckStatus.SUPERSEDED})  # what a record keeps
_COVERED = "occurred before the key's last applied count, which already includes it"
_COUNT_COVERED = "older than the key's last applied count"
_COUNT_OUTSIDE = "older than the key's history window: the deltas after it are no longer all known"
_REASONS = {kind.value: ChangeReason(kind.value) for kind in FeedEventKind}
_UNCHECKED = Invalid("", "")  # a key not checked yet in this batch


def ingest(
    state: PartitionState, command: Ingest, at: Effects
) -> Ingested | Invalid | CapacityExhausted:
    full = state.refuse_feed_facts() if command.events else None
    if full is not None:  # the process's histories are full: nothing of it is applied
        return full
    for index, location_id in enumerate(command.alive_at):
        if partition_of(command.merchant_id, location_id) != state.partition:
            return Invalid(f"alive_at[{index}]", f"not in partition {state.partition}")
    batch = _Batch(state, at.now_ms)
    acks = tuple(batch.judge(event, command) for event in command.events)
    alive_at = batch.heartbeats(command)
    return Ingested(acks, batch.finish(state, at, command.source), alive_at)


def recorded_events(command: Ingest, outcome: Ingested) -> tuple[FeedEvent, ...]:
    """The events a record of this ingest keeps: those applied or superseded."""
    return tuple(
        event
        for event, ack in zip(command.events, outcome.acks, strict=True)
        if ack.status in RECORDED
    )


# --------------------------------------------------------------- the service's own facts


def own_delta(
    state: PartitionState,
    key: InventoryKey,
    at: Effects,
    delta: int,
    *,
    occurred_at_ms: int,
    kind: str,
    event_id: str = "",
) -> int:
    """A physical change the service makes itself: the change of on_hand it makes now (0
    when a later count already covers it). The caller changes the row. Its id is the
    record's lsn unless the record makes several facts of one key (``event_id``)."""
    found = state.feed.get(key) or EMPTY_HISTORY
    fact = Fact(occurred_at_ms, OWN_SOURCE, event_id or f"{at.lsn:012d}", delta, kind)
    if found.covered_by_count(fact.order):
        return 0
    kept, dropped = history_rules.with_delta(found, fact, at.now_ms)
    _keep(state, key, found, kept, dropped)
    return delta


def own_count(state: PartitionState, key: InventoryKey, at: Effects, on_hand: int) -> int | None:
    """An absolute on_hand the service sets now (``SetStock``): the on_hand it makes, or
    None when a count of a later time (a till's clock running ahead) covers it. An on_hand
    beyond the bounds is returned with nothing kept: the caller refuses it."""
    found = state.feed.get(key) or EMPTY_HISTORY
    fact = Fact(at.now_ms, OWN_SOURCE, f"{at.lsn:012d}", on_hand, "set")
    if found.covered_by_count(fact.order):
        return None
    after = history_rules.on_hand_after_count(found, fact)
    if abs(after) <= limits.stock_quantity_max:
        kept, dropped = history_rules.with_count(found, fact, at.now_ms)
        _keep(state, key, found, kept, dropped)
    return after


def _keep(
    state: PartitionState,
    key: InventoryKey,
    before: KeyHistory,
    after: KeyHistory,
    dropped: list[Fact],
) -> None:
    if after is not before:
        state.unindex_facts(key, dropped)
        state.put_history(key, before, after)


# ------------------------------------------------------------------------ one batch


@dataclass(slots=True)
class _Key:
    """One key while its events are judged: its counts and history as they stand."""

    row: StockRow | None  # as the record found it
    on_hand: int
    history: KeyHistory
    found: KeyHistory  # the history as the record found it
    # Deltas applied by this record, not yet merged into ``history`` (merged once, at the
    # end or before a count: rebuilding the history per event cost O(history) each).
    pending: list[Fact] = field(default_factory=list)
    recorded: bool = False
    # The newest occurred_at of its events this record recorded (what its location was
    # heard from at; kept per key, not per location: a location tuple per event cost ~1 µs).
    newest_ms: int = 0
    # The kind of the first event applied to it, and whether others were applied too.
    first_kind: str = ""
    several: bool = False

    def moved(self, kind: str) -> None:
        if self.first_kind:
            self.several = True
        else:
            self.first_kind = kind


class _Batch:
    def __init__(self, state: PartitionState, now_ms: int) -> None:
        self._state = state
        self._now_ms = now_ms
        self._keys: dict[InventoryKey, _Key] = {}
        self._key_problems: dict[InventoryKey, Invalid | None] = {}
        self._recorded: list[tuple[InventoryKey, _Key]] = []
        # location -> why its events are refused (None: they are not), checked once a batch
        self._locations: dict[str, Invalid | None] = {}
        self._new_keys = 0
        # The heartbeat's locations heard from (those of recorded events are the keys').
        self._beats: dict[FeedLocation, int] = {}
        # Units of expected deliveries received, per (delivery_id, key).
        self._received: dict[tuple[str, InventoryKey], int] = {}

    def judge(self, event: FeedEvent, command: Ingest) -> EventAck:
        state = self._state
        key = event.key
        # A batch's events share few keys: each key is checked (and hashed) once.
        work = self._keys.get(key)
        if work is None:
            problem = self._key_problems.get(key, _UNCHECKED)
            if problem is _UNCHECKED:
                problem = self._key_problems[key] = self._key_problem(key, command)
            problem = problem or _validate.validate_feed_fields(event, self._now_ms)
            if problem is not None:
                return EventAck(AckStatus.REFUSED, problem.field, problem.reason)
            row = state.stock.get(key)
            found = state.feed.get(key) or EMPTY_HISTORY
            work = self._keys[key] = _Key(row, row.on_hand if row else 0, found, found)
        else:
            problem = _validate.validate_feed_fields(event, self._now_ms)
            if problem is not None:
                return EventAck(AckStatus.REFUSED, problem.field, problem.reason)
        kind = event.kind
        assert kind is not None, "validated"
        if kind.is_count:
            assert event.count is not None, "validated"
            fact = Fact(event.occurred_at_ms, command.source, event.event_id, event.count, "count")
            ack = self._count(work, key, fact)
        else:
            quantity = event.quantity * kind.sign
            fact = Fact(event.occurred_at_ms, command.source, event.event_id, quantity, kind.value)
            ack = self._delta(work, key, fact)
        if ack is APPLIED or ack.status is AckStatus.SUPERSEDED:
            if not work.recorded:
                work.recorded = True
                self._recorded.append((key, work))
            work.newest_ms = max(work.newest_ms, event.occurred_at_ms)
            if event.delivery_id:
                received = (event.delivery_id, key)
                self._received[received] = self._received.get(received, 0) + event.quantity
        return ack

    def heartbeats(self, command: Ingest) -> tuple[str, ...]:
        """The heartbeat's locations whose health the record keeps; each is heard from."""
        if not command.alive_at:
            return ()
        kept = []
        with_events = {(k.merchant_id, k.location_id) for k, _ in self._recorded}
        for location_id in command.alive_at:
            location = FeedLocation(command.merchant_id, location_id)
            if location in with_events or location in self._beats:
                continue  # its events were heard already (or it is named twice)
            if staleness.heartbeat_kept(self._state, location, command.source, self._now_ms):
                kept.append(location_id)
                self._beats[location] = 0
        return tuple(kept)

    def _key_problem(self, key: InventoryKey, command: Ingest) -> Invalid | None:
        """The key's checks, its partition's hashed once per location of the batch."""
        problem = _validate.validate_feed_key(key, command.merchant_id)
        if problem is not None:
            return problem
        if key.location_id not in self._locations:
            self._locations[key.location_id] = self._location_problem(key, command.source)
        return self._locations[key.location_id]

    def _location_problem(self, key: InventoryKey, source: str) -> Invalid | None:
        if partition_of(key.merchant_id, key.location_id) != self._state.partition:
            return Invalid("key", f"not in partition {self._state.partition}")
        location = FeedLocation(key.merchant_id, key.location_id)
        full = staleness.source_problem(self._state, location, source)
        return None if full is None else Invalid("source", full)

    def _delta(self, work: _Key, key: InventoryKey, fact: Fact) -> EventAck:
        history = work.history
        if history.count is not None and fact <= history.count:  # facts compare as orders
            return EventAck(AckStatus.SUPERSEDED, reason=_COVERED)
        if history.outside_window(fact, self._now_ms):
            return EventAck(AckStatus.REFUSED, "occurred_at_ms", _OUTSIDE_WINDOW)
        seen = self._seen(key, fact)
        if seen is not None:
            return seen
        on_hand = work.on_hand + fact.quantity
        refused = self._refused(work, on_hand, "quantity")
        if refused is not None:
            return refused
        work.on_hand = on_hand
        work.pending.append(fact)
        self._state.feed_ids[(key.merchant_id, fact.source, fact.event_id)] = (key, fact)
        work.moved(fact.kind)
        return APPLIED

    def _count(self, work: _Key, key: InventoryKey, fact: Fact) -> EventAck:
        seen = self._seen(key, fact)
        if seen is not None:
            return seen
        self._merge(key, work)
        history = work.history
        if history.covered_by_count(fact.order):
            return EventAck(AckStatus.SUPERSEDED, reason=_COUNT_COVERED)
        if history.outside_window(fact, self._now_ms):
            return EventAck(AckStatus.SUPERSEDED, reason=_COUNT_OUTSIDE)
        on_hand = history_rules.on_hand_after_count(history, fact)
        refused = self._refused(work, on_hand, "count")
        if refused is not None:
            return refused
        work.on_hand = on_hand
        work.history, dropped = history_rules.with_count(history, fact, self._now_ms)
        self._state.index_facts(key, (fact,))  # then what the history dropped leaves it
        self._state.unindex_facts(key, dropped)
        work.moved(fact.kind)
        return APPLIED

    def _refused(self, work: _Key, on_hand: int, field: str) -> EventAck | None:
        """Why a judged fact cannot apply: on_hand out of bounds, or no room for its key."""
        if abs(on_hand) > limits.stock_quantity_max:
            reason = f"on_hand would leave ±{limits.stock_quantity_max}"
            return EventAck(AckStatus.REFUSED, field, reason)
        return self._refuse_new_key(work)

    def _merge(self, key: InventoryKey, work: _Key) -> None:
        """The record's pending deltas join the key's history (within its window and bound);
        what the history drops leaves the index."""
        if work.pending:
            work.history, dropped = history_rules.with_deltas(
                work.history, work.pending, self._now_ms
            )
            work.pending = []
            self._state.unindex_facts(key, dropped)

    def _seen(self, key: InventoryKey, fact: Fact) -> EventAck | None:
        """DUPLICATE if this very event is kept, REFUSED if its id names another event;
        None if the id is free. A kept delta that has left its window by now counts as
        forgotten, whether or not its history was pruned yet: the answer never depends on
        when a key was last written."""
        found = self._state.feed_ids.get((key.merchant_id, fact.source, fact.event_id))
        if found is None:
            return None
        seen_key, seen_fact = found
        if seen_key == key and seen_fact == fact:
            return DUPLICATE
        history = self._history_of(seen_key)
        if history.count != seen_fact and history.outside_window(seen_fact, self._now_ms):
            return None
        reason = "already used by another event of this source"
        return EventAck(AckStatus.REFUSED, "event_id", reason)

    def _history_of(self, key: InventoryKey) -> KeyHistory:
        work = self._keys.get(key)
        if work is not None:
            return work.history
        return self._state.feed.get(key) or EMPTY_HISTORY

    def _refuse_new_key(self, work: _Key) -> EventAck | None:
        if work.row is not None or work.first_kind:
            return None
        refused = self._state.refuse_new_key(pending=self._new_keys)
        if refused is not None:
            reason = f"no room for a new key: {refused.limit_name} ({refused.limit}) reached"
            return EventAck(AckStatus.REFUSED, "key", reason)
        self._new_keys += 1
        return None

    def finish(self, state: PartitionState, at: Effects, source: str) -> tuple[OverCommitted, ...]:
        """Write each key's row and history once, clear the flags of the stale locations
        heard from, keep the source's health; the keys left over-committed."""
        over_committed = []
        heard = self._heard()
        resuming = staleness.resuming(state, heard)
        received = deliveries.receive(state, self._received) if self._received else set()
        changed: set[InventoryKey] = set()
        # In the order of each key's first recorded event: the order a replay of the record
        # (which holds only those) sees them in, so events and answers replay the same.
        for key, work in self._recorded:
            self._merge(key, work)
            if work.history is not work.found:
                state.put_history(key, work.found, work.history)
            row = work.row
            moved = work.first_kind and (row is None or work.on_hand != row.on_hand)
            resumed = bool(resuming) and (key.merchant_id, key.location_id) in resuming
            arrived = bool(received) and key in received
            if moved or ((resumed or arrived) and row is not None):
                if moved or arrived:
                    first_kind = work.first_kind or FeedEventKind.RECEIPT.value
                    reason = ChangeReason.FEED if work.several else _REASONS[first_kind]
                else:
                    reason = ChangeReason.FEED_RESUMED
                counts = {"on_hand": work.on_hand, "safety_stock": row.safety_stock if row else 0}
                if resumed:
                    counts |= {"stale_buffer": 0, "stale_since_ms": 0}
                if arrived:
                    counts |= deliveries.incoming_counts(state, key)
                state.change(key, at, reason, **counts)
                changed.add(key)
            if key in state.stock:
                over = state.over_commit(key)
                if over is not None:
                    over_committed.append(OverCommitted(key, over))
        if resuming:
            staleness.resume(state, at, resuming, changed)
        staleness.heard(state, at, source, heard)
        return tuple(over_committed)

    def _heard(self) -> dict[FeedLocation, int]:
        """The locations this record heard from, in the order of their first recorded event
        (then the heartbeat's): the newest occurred_at of the events recorded at each (0 for
        a heartbeat)."""
        heard: dict[FeedLocation, int] = {}
        for key, work in self._recorded:
            location = FeedLocation(key.merchant_id, key.location_id)
            heard[location] = max(heard.get(location, 0), work.newest_ms)
        return heard | self._beats


_WINDOW = (
    f"the last {limits.feed_history_retention_ms // 3_600_000} h "
    f"or its last {limits.feed_history_per_key_max} deltas"
)
_OUTSIDE_WINDOW = (
    f"older than this key's history window ({_WINDOW}): it cannot be told from an event "
    "already applied, so it is not applied; send a count"
)
