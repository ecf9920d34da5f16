"""Feeds (DESIGN section 9): late, duplicated, out-of-order deltas and counts end exact.

The property: for any set of deltas and counts, every reordering and duplication of their
delivery, cut into any batches, ends at the on_hand of applying each once in occurred_at
order (a count sets on_hand, a delta moves it). Then the rules one by one: what each
acknowledgement means, what a record keeps, the window and its edges, and how a late count
accounts for the service's own physical facts.
"""

from __future__ import annotations

import json
from dataclasses import replace

import hypothesis.strategies as st
from hypothesis import given, settings

from inventory_core import (
    AckStatus,
    AdjustmentReason,
    AdjustStock,
    Commit,
    FeedEvent,
    FeedEventKind,
    Ingest,
    Ingested,
    InventoryKey,
    Line,
    Partition,
    Record,
    Reserve,
    Reserved,
    SetStock,
    StockChanged,
    command_from_data,
    command_to_data,
    limits,
    partition_of,
)

MERCHANT = "m1"
LOCATION = "store-1"
PARTITION = partition_of(MERCHANT, LOCATION)
KEYS = (InventoryKey(MERCHANT, "milk", LOCATION), InventoryKey(MERCHANT, "eggs", LOCATION))
T0_MS = 1_780_000_000_000
HOUR_MS = 3_600_000
SOURCE = "pos-1"

FEED = settings(max_examples=300, deadline=None, print_blob=True)


def sale(event_id: str, quantity: int, at_ms: int, key: InventoryKey = KEYS[0]) -> FeedEvent:
    return FeedEvent(event_id, FeedEventKind.SALE, key, at_ms, quantity=quantity)


def receipt(event_id: str, quantity: int, at_ms: int, key: InventoryKey = KEYS[0]) -> FeedEvent:
    return FeedEvent(event_id, FeedEventKind.RECEIPT, key, at_ms, quantity=quantity)


def count(event_id: str, value: int, at_ms: int, key: InventoryKey = KEYS[0]) -> FeedEvent:
    return FeedEvent(event_id, FeedEventKind.COUNT, key, at_ms, count=value)


def ingest(events: list[FeedEvent], now_ms: int, source: str = SOURCE) -> Ingest:
    return Ingest(MERCHANT, source, tuple(events), now_ms)


def send(partition: Partition, events: list[FeedEvent], now_ms: int) -> Ingested:
    step = partition.apply(ingest(events, now_ms))
    assert isinstance(step.outcome, Ingested), step.outcome
    partition.check_invariants()
    return step.outcome


def on_hand(partition: Partition, key: InventoryKey = KEYS[0]) -> int:
    return partition.levels([key], T0_MS)[0].on_hand


def statuses(outcome: Ingested) -> list[AckStatus]:
    return [ack.status for ack in outcome.acks]


def replayed(records: list[Record]) -> Partition:
    replica = Partition(PARTITION)
    for record in records:
        logged = command_from_data(json.loads(json.dumps(command_to_data(record.command))))
        replica.replay(Record(record.partition, record.lsn, logged))
    return replica


# ------------------------------------------------------------------------ the property


@st.composite
def feed_histories(draw: st.DrawFn) -> list[FeedEvent]:
    """Deltas and counts with distinct ids over a few minutes, with ties in time."""
    size = draw(st.integers(1, 30))
    events = []
    for index in range(size):
        key = draw(st.sampled_from(KEYS))
        at_ms = T0_MS + draw(st.integers(0, 20)) * 1000
        kind = draw(st.sampled_from(FeedEventKind))
        if kind is FeedEventKind.COUNT:
            event = count(f"e{index}", draw(st.integers(0, 50)), at_ms, key)
        elif kind is FeedEventKind.ADJUSTMENT:
            quantity = draw(st.integers(-5, 5).filter(bool))
            event = FeedEvent(f"e{index}", kind, key, at_ms, quantity=quantity)
        else:
            event = FeedEvent(f"e{index}", kind, key, at_ms, quantity=draw(st.integers(1, 5)))
        events.append(event)
    return events


def in_order(events: list[FeedEvent], key: InventoryKey) -> int:
    """The specification: each event once, in (occurred_at, source, event_id) order."""
    value = 0
    for event in sorted(events, key=lambda e: (e.occurred_at_ms, SOURCE, e.event_id)):
        if event.key != key:
            continue
        assert event.kind is not None
        if event.kind is FeedEventKind.COUNT:
            assert event.count is not None
            value = event.count
        else:
            value += event.quantity * event.kind.sign
    return value


@FEED
@given(events=feed_histories(), data=st.data())
def test_any_delivery_order_with_duplicates_ends_as_applying_each_once_in_time_order(
    events: list[FeedEvent], data: st.DataObject
) -> None:
    extra = data.draw(st.lists(st.sampled_from(events), max_size=len(events)), label="duplicates")
    delivery = data.draw(st.permutations(events + extra), label="delivery")
    partition = Partition(PARTITION)
    records: list[Record] = []
    now_ms = T0_MS + 30_000
    while delivery:
        size = data.draw(st.integers(1, len(delivery)), label="batch")
        batch, delivery = delivery[:size], delivery[size:]
        step = partition.apply(ingest(batch, now_ms))
        records.extend(step.records)
        partition.check_invariants()
        now_ms += data.draw(st.integers(0, 60_000), label="pause")
    for key in KEYS:
        assert on_hand(partition, key) == in_order(events, key), key
    assert replayed(records).snapshot() == partition.snapshot()
    recorded = {e.event_id for r in records for e in r.command.events}  # type: ignore[union-attr]
    assert recorded == {e.event_id for e in events}, "every event is in the ledger"


# --------------------------------------------------------------------- acknowledgements


def test_each_event_is_acknowledged_applied_duplicate_or_superseded() -> None:
    partition = Partition(PARTITION)
    first = send(partition, [receipt("r1", 10, T0_MS), sale("s1", 2, T0_MS + 1000)], T0_MS + 5000)
    assert statuses(first) == [AckStatus.APPLIED, AckStatus.APPLIED]
    assert on_hand(partition) == 8
    again = send(partition, [sale("s1", 2, T0_MS + 1000)], T0_MS + 6000)
    assert statuses(again) == [AckStatus.DUPLICATE]
    assert on_hand(partition) == 8
    counted = send(partition, [count("c1", 20, T0_MS + 2000)], T0_MS + 7000)
    assert statuses(counted) == [AckStatus.APPLIED]
    assert on_hand(partition) == 20
    late = send(partition, [sale("s0", 1, T0_MS + 1500)], T0_MS + 8000)
    assert statuses(late) == [AckStatus.SUPERSEDED]
    assert "last applied count" in late.acks[0].reason
    assert on_hand(partition) == 20
    older = send(partition, [count("c0", 99, T0_MS + 1800)], T0_MS + 9000)
    assert statuses(older) == [AckStatus.SUPERSEDED]
    assert on_hand(partition) == 20


def test_a_late_count_is_its_value_plus_the_deltas_that_occurred_after_it() -> None:
    partition = Partition(PARTITION)
    send(partition, [receipt("r1", 10, T0_MS + 1000), sale("s1", 3, T0_MS + 3000)], T0_MS + 4000)
    outcome = send(partition, [count("c1", 7, T0_MS + 2000)], T0_MS + 5000)
    assert statuses(outcome) == [AckStatus.APPLIED]
    assert on_hand(partition) == 7 - 3  # the receipt before the count is in it; the sale not


def test_a_batch_makes_one_change_per_key_and_its_record_keeps_only_what_it_recorded() -> None:
    partition = Partition(PARTITION)
    send(partition, [receipt("r1", 10, T0_MS)], T0_MS + 1000)
    events = [
        sale("s1", 1, T0_MS + 100),
        receipt("r1", 10, T0_MS),  # duplicate
        FeedEvent("bad", None, KEYS[0], T0_MS),  # refused
        sale("s2", 2, T0_MS + 200),
    ]
    step = partition.apply(ingest(events, T0_MS + 2000))
    assert isinstance(step.outcome, Ingested)
    assert statuses(step.outcome) == [
        AckStatus.APPLIED,
        AckStatus.DUPLICATE,
        AckStatus.REFUSED,
        AckStatus.APPLIED,
    ]
    (record,) = step.records
    assert isinstance(record.command, Ingest)
    assert [e.event_id for e in record.command.events] == ["s1", "s2"]
    (change,) = step.events
    assert (change.before.on_hand, change.after.on_hand, change.reason.value) == (10, 7, "feed")
    assert change.after.version == change.before.version + 1


def test_a_batch_that_records_nothing_logs_nothing() -> None:
    partition = Partition(PARTITION)
    send(partition, [receipt("r1", 10, T0_MS)], T0_MS + 1000)
    head = partition.head_lsn
    step = partition.apply(ingest([receipt("r1", 10, T0_MS), count("bad", -1, T0_MS)], T0_MS + 2))
    assert isinstance(step.outcome, Ingested)
    assert statuses(step.outcome) == [AckStatus.DUPLICATE, AckStatus.REFUSED]
    assert (step.records, step.events, partition.head_lsn) == ((), (), head)


def test_bad_events_are_refused_with_their_field_and_the_rest_is_applied() -> None:
    partition = Partition(PARTITION)
    other = InventoryKey("m2", "milk", LOCATION)
    events = [
        FeedEvent("e1", None, KEYS[0], T0_MS, quantity=1),
        count("e2", -3, T0_MS),
        sale("", 1, T0_MS),
        sale("e4", 1, T0_MS, key=other),
        receipt("e5", 4, T0_MS),
        FeedEvent("e6", FeedEventKind.COUNT, KEYS[0], T0_MS),
        FeedEvent("e7", FeedEventKind.SALE, KEYS[0], T0_MS, quantity=1, count=3),
        sale("e8", 0, T0_MS),
        sale("e9", 1, 0),
        sale("e10", 1, T0_MS + limits.feed_clock_skew_ms_max + 60_000),
        sale("x" * (limits.event_id_length_max + 1), 1, T0_MS),
        sale("e12", 1, T0_MS, key=InventoryKey(MERCHANT, "milk", "elsewhere")),
    ]
    outcome = send(partition, events, T0_MS)
    fields = [(ack.status, ack.field) for ack in outcome.acks]
    refused = AckStatus.REFUSED
    assert fields == [
        (refused, "kind"),
        (refused, "count"),
        (refused, "event_id"),
        (refused, "key.merchant_id"),
        (AckStatus.APPLIED, ""),
        (refused, "count"),
        (refused, "count"),
        (refused, "quantity"),
        (refused, "occurred_at_ms"),
        (refused, "occurred_at_ms"),
        (refused, "event_id"),
        (refused, "key"),
    ]
    assert all(ack.reason for ack in outcome.acks if ack.status is refused)
    assert on_hand(partition) == 4


def test_an_event_id_used_again_for_another_event_is_refused() -> None:
    partition = Partition(PARTITION)
    send(partition, [sale("s1", 1, T0_MS)], T0_MS + 10)
    outcome = send(partition, [sale("s1", 2, T0_MS)], T0_MS + 20)
    assert [(a.status, a.field) for a in outcome.acks] == [(AckStatus.REFUSED, "event_id")]
    other_key = send(partition, [sale("s1", 1, T0_MS, key=KEYS[1])], T0_MS + 30)
    assert statuses(other_key) == [AckStatus.REFUSED]
    other_source = partition.apply(ingest([sale("s1", 1, T0_MS)], T0_MS + 40, source="pos-2"))
    assert statuses(other_source.outcome) == [AckStatus.APPLIED]  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- window


def test_a_delta_older_than_the_window_is_refused_and_a_count_is_superseded() -> None:
    partition = Partition(PARTITION)
    send(partition, [receipt("r1", 10, T0_MS)], T0_MS)
    now_ms = T0_MS + limits.feed_history_retention_ms + HOUR_MS
    old_ms = now_ms - limits.feed_history_retention_ms - 1
    outcome = send(partition, [sale("s1", 1, old_ms), count("c1", 3, old_ms)], now_ms)
    assert [(a.status, a.field) for a in outcome.acks] == [
        (AckStatus.REFUSED, "occurred_at_ms"),
        (AckStatus.SUPERSEDED, ""),
    ]
    assert on_hand(partition) == 10
    edge = send(partition, [sale("s2", 1, old_ms + 1)], now_ms)
    assert statuses(edge) == [AckStatus.APPLIED]


def test_a_redelivery_after_its_delta_left_the_window_is_not_applied_again() -> None:
    partition = Partition(PARTITION)
    send(partition, [sale("s1", 1, T0_MS)], T0_MS)
    later_ms = T0_MS + limits.feed_history_retention_ms + 1
    outcome = send(partition, [sale("s1", 1, T0_MS), sale("s2", 1, later_ms)], later_ms)
    assert statuses(outcome) == [AckStatus.REFUSED, AckStatus.APPLIED]
    assert on_hand(partition) == -2


def test_past_the_per_key_bound_the_oldest_deltas_are_forgotten_and_older_ones_refused() -> None:
    partition = Partition(PARTITION)
    bound = limits.feed_history_per_key_max
    for start in range(0, bound + 10, limits.ingest_events_max):
        size = min(limits.ingest_events_max, bound + 10 - start)
        events = [receipt(f"r{start + i:05d}", 1, T0_MS + start + i) for i in range(size)]
        send(partition, events, T0_MS + HOUR_MS)
    assert on_hand(partition) == bound + 10
    # r00009 was forgotten (one of the ten oldest); r00010 is still known.
    outcome = send(
        partition,
        [receipt("r00009", 1, T0_MS + 9), receipt("r00010", 1, T0_MS + 10)],
        T0_MS + HOUR_MS,
    )
    assert statuses(outcome) == [AckStatus.REFUSED, AckStatus.DUPLICATE]
    assert on_hand(partition) == bound + 10


# ------------------------------------------------------------ the service's own facts


def test_a_late_count_accounts_for_units_picked_for_online_orders_after_it() -> None:
    partition = Partition(PARTITION)
    partition.apply(SetStock(KEYS[0], "set-1", 10, None, T0_MS))
    reserved = partition.apply(Reserve(MERCHANT, "cart-1", (Line(KEYS[0], 3),), 0, T0_MS + 10))
    assert isinstance(reserved.outcome, Reserved)
    reservation_id = reserved.outcome.reservation.reservation_id
    partition.apply(Commit(MERCHANT, "commit-1", reservation_id, (), T0_MS + 60_000))
    assert on_hand(partition) == 7
    # The store counted 10 at T0 + 30 s, before the picker took the 3 units.
    send(partition, [count("c1", 10, T0_MS + 30_000)], T0_MS + 120_000)
    assert on_hand(partition) == 7
    partition.check_invariants()


def test_a_count_after_an_adjustment_and_a_set_stock_replaces_them() -> None:
    partition = Partition(PARTITION)
    partition.apply(SetStock(KEYS[0], "set-1", 10, None, T0_MS))
    partition.apply(AdjustStock(KEYS[0], "adj-1", -2, AdjustmentReason.SHRINKAGE, 0, T0_MS + 1000))
    send(partition, [count("c1", 5, T0_MS + 2000)], T0_MS + 3000)
    assert on_hand(partition) == 5
    send(partition, [count("c0", 50, T0_MS + 500)], T0_MS + 4000)  # older: superseded
    assert on_hand(partition) == 5


def test_a_set_stock_covered_by_a_count_dated_ahead_says_so() -> None:
    partition = Partition(PARTITION)
    send(partition, [count("c1", 5, T0_MS + 60_000)], T0_MS)  # the till's clock runs ahead
    step = partition.apply(SetStock(KEYS[0], "set-1", 9, None, T0_MS + 1000))
    assert isinstance(step.outcome, StockChanged)
    assert step.outcome.superseded and step.outcome.level.on_hand == 5
    assert len(step.records) == 1  # recorded all the same


def test_sales_at_the_till_over_commit_and_name_the_newest_reservations_at_risk() -> None:
    partition = Partition(PARTITION)
    send(partition, [receipt("r1", 5, T0_MS)], T0_MS)
    ids = []
    for index in range(3):
        step = partition.apply(
            Reserve(MERCHANT, f"cart-{index}", (Line(KEYS[0], 1),), 0, T0_MS + 10 + index)
        )
        assert isinstance(step.outcome, Reserved)
        ids.append(step.outcome.reservation.reservation_id)
    outcome = send(partition, [sale("s1", 4, T0_MS + 5)], T0_MS + 100)
    (over,) = outcome.over_committed
    assert over.key == KEYS[0]
    assert over.over_commit.exposure == 2  # on_hand 1, reserved 3
    assert over.over_commit.reservations_at_risk == (ids[2], ids[1])
    assert partition.over_committed_count == 1


def test_a_replayed_ingest_rebuilds_the_same_state() -> None:
    partition = Partition(PARTITION)
    records: list[Record] = []
    for events, now_ms in (
        ([receipt("r1", 10, T0_MS), sale("s1", 1, T0_MS + 5)], T0_MS + 10),
        ([count("c1", 4, T0_MS + 3), sale("s1", 1, T0_MS + 5)], T0_MS + 20),
        (
            [sale("s0", 1, T0_MS + 1), replace(sale("s2", 2, T0_MS + 9), reason="damaged")],
            T0_MS + 30,
        ),
    ):
        records.extend(partition.apply(ingest(events, now_ms)).records)
    assert on_hand(partition) == 4 - 1 - 2
    assert replayed(records).snapshot() == partition.snapshot()


def test_the_over_committed_keys_of_a_location_are_listed_with_their_reservations_at_risk() -> None:
    partition = Partition(PARTITION)
    other_merchant = InventoryKey("m2", "milk", LOCATION)
    send(partition, [receipt("r1", 2, T0_MS), receipt("r2", 5, T0_MS, key=KEYS[1])], T0_MS)
    partition.apply(SetStock(other_merchant, "set-m2", 0, None, T0_MS))
    held = partition.apply(Reserve(MERCHANT, "cart-1", (Line(KEYS[0], 2),), 0, T0_MS + 1))
    assert isinstance(held.outcome, Reserved)
    assert partition.over_committed_at(MERCHANT, [LOCATION]) == ()
    send(partition, [sale("s1", 1, T0_MS + 2), sale("s2", 1, T0_MS + 3, key=KEYS[1])], T0_MS + 5)
    (found,) = partition.over_committed_at(MERCHANT, [LOCATION, "elsewhere"])
    assert found.key == KEYS[0]
    assert found.over_commit.exposure == 1
    assert found.over_commit.reservations_at_risk == (held.outcome.reservation.reservation_id,)
    assert partition.over_committed_at("m2", [LOCATION]) == ()
    send(partition, [receipt("r3", 1, T0_MS + 6)], T0_MS + 7)  # covered again
    assert partition.over_committed_at(MERCHANT, [LOCATION]) == ()
