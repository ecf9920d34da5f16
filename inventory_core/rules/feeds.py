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

from collections.abc import Callable
from dataclasses import dataclass

from .. import _history as history_rules
from .. import _limits as limits
from .. import _validate
from .._commands import FeedEvent, Ingest
from .._history import EMPTY_HISTORY, OWN_SOURCE, Fact, KeyHistory
from .._model import ChangeReason, FeedEventKind, InventoryKey, StockRow
from .._outcomes import AckStatus, EventAck, Ingested, OverCommitted
from .._state import Effects, PartitionState

APPLIED = EventAck(AckStatus.APPLIED)
DUPLICATE = EventAck(AckStatus.DUPLICATE)
RECORDED = frozenset({AckStatus.APPLIED, AckStatus.SUPERSEDED})
_COVERED = "occurred before the key's last applied count, which already includes it"
_COUNT_COVERED = "older than the key's last applied count"
_COUNT_OUTSIDE = "older than the key's history window: the deltas after it are no longer all known"
_REASONS = {kind.value: ChangeReason(kind.value) for kind in FeedEventKind}


def ingest(state: PartitionState, command: Ingest, at: Effects) -> Ingested:
    batch = _Batch(state, at.now_ms)
    acks = tuple(batch.judge(event, command) for event in command.events)
    return Ingested(acks, batch.finish(state, at))


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
) -> int:
    """A physical change the service makes itself: the change of on_hand it makes now (0
    when a later count already covers it). The caller changes the row."""
    found = state.feed.get(key) or EMPTY_HISTORY
    fact = Fact(occurred_at_ms, OWN_SOURCE, f"{at.lsn:012d}", delta, kind)
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
        state.feed.put(key, after)


# ------------------------------------------------------------------------ one batch


@dataclass(slots=True)
class _Key:
    """One key while its events are judged: its counts and history as they stand."""

    row: StockRow | None  # as the record found it
    on_hand: int
    history: KeyHistory
    recorded: bool = False
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
        self._new_keys = 0

    def judge(self, event: FeedEvent, command: Ingest) -> EventAck:
        state = self._state
        problem = _validate.validate_feed_event(
            event, command.merchant_id, state.partition, self._now_ms
        )
        if problem is not None:
            return EventAck(AckStatus.REFUSED, problem.field, problem.reason)
        assert event.kind is not None, "validated"
        key = event.key
        work = self._keys.get(key)
        if work is None:
            row = state.stock.get(key)
            found = state.feed.get(key) or EMPTY_HISTORY
            work = self._keys[key] = _Key(row, row.on_hand if row else 0, found)
        quantity = event.count if event.kind.is_count else event.quantity * event.kind.sign
        assert quantity is not None, "validated"
        fact = Fact(
            event.occurred_at_ms, command.source, event.event_id, quantity, event.kind.value
        )
        judge = self._count if event.kind.is_count else self._delta
        ack = judge(work, key, fact)
        work.recorded |= ack.status in RECORDED
        return ack

    def _delta(self, work: _Key, key: InventoryKey, fact: Fact) -> EventAck:
        if work.history.covered_by_count(fact.order):
            return EventAck(AckStatus.SUPERSEDED, reason=_COVERED)
        if work.history.outside_window(fact, self._now_ms):
            return EventAck(AckStatus.REFUSED, "occurred_at_ms", _OUTSIDE_WINDOW)
        seen = self._seen(key, fact)
        if seen is not None:
            return seen
        on_hand = work.on_hand + fact.quantity
        return self._move(work, key, fact, on_hand, field="quantity", keep=history_rules.with_delta)

    def _count(self, work: _Key, key: InventoryKey, fact: Fact) -> EventAck:
        seen = self._seen(key, fact)
        if seen is not None:
            return seen
        if work.history.covered_by_count(fact.order):
            return EventAck(AckStatus.SUPERSEDED, reason=_COUNT_COVERED)
        if work.history.outside_window(fact, self._now_ms):
            return EventAck(AckStatus.SUPERSEDED, reason=_COUNT_OUTSIDE)
        on_hand = history_rules.on_hand_after_count(work.history, fact)
        return self._move(work, key, fact, on_hand, field="count", keep=history_rules.with_count)

    def _move(
        self,
        work: _Key,
        key: InventoryKey,
        fact: Fact,
        on_hand: int,
        *,
        field: str,
        keep: Callable[[KeyHistory, Fact, int], tuple[KeyHistory, list[Fact]]],
    ) -> EventAck:
        """Apply a judged fact: the key's on_hand becomes ``on_hand`` and its history keeps
        the fact (``keep``); refused if that leaves the bounds or needs a key with no room."""
        if abs(on_hand) > limits.stock_quantity_max:
            reason = f"on_hand would leave ±{limits.stock_quantity_max}"
            return EventAck(AckStatus.REFUSED, field, reason)
        refused = self._refuse_new_key(work)
        if refused is not None:
            return refused
        work.on_hand = on_hand
        work.history, dropped = keep(work.history, fact, self._now_ms)
        self._state.index_facts(key, (fact,))  # then what the history dropped leaves it
        self._state.unindex_facts(key, dropped)
        work.moved(fact.kind)
        return APPLIED

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

    def finish(self, state: PartitionState, at: Effects) -> tuple[OverCommitted, ...]:
        """Write each key's row and history once; the keys left over-committed."""
        over_committed = []
        for key, work in self._keys.items():
            if not work.recorded:
                continue
            if work.history != (state.feed.get(key) or EMPTY_HISTORY):
                state.feed.put(key, work.history)
            row = work.row
            if work.first_kind and (row is None or work.on_hand != row.on_hand):
                reason = ChangeReason.FEED if work.several else _REASONS[work.first_kind]
                safety_stock = row.safety_stock if row else 0
                state.change(key, at, reason, on_hand=work.on_hand, safety_stock=safety_stock)
            if key in state.stock:
                over = state.over_commit(key)
                if over is not None:
                    over_committed.append(OverCommitted(key, over))
        return tuple(over_committed)


_WINDOW = (
    f"the last {limits.feed_history_retention_ms // 3_600_000} h "
    f"or its last {limits.feed_history_per_key_max} deltas"
)
_OUTSIDE_WINDOW = (
    f"older than this key's history window ({_WINDOW}): it cannot be told from an event "
    "already applied, so it is not applied; send a count"
)
