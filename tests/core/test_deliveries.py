"""Incoming stock (issue 10, deliverable 5): expected deliveries shown in reads, never
counted as available, turned into on_hand by the receipts that name them."""

from __future__ import annotations

import json

import pytest

import inventory_core
from inventory_core import (
    TABLES,
    CapacityExhausted,
    ChangeReason,
    DeliveryExpected,
    ExpectDelivery,
    FeedEvent,
    FeedEventKind,
    Ingest,
    Ingested,
    InsufficientStock,
    Invalid,
    InventoryKey,
    Line,
    Partition,
    Record,
    Reserve,
    SetStock,
    command_from_data,
    command_to_data,
    partition_of,
)

MERCHANT, STORE = "m1", "store-1"
PARTITION = partition_of(MERCHANT, STORE)
T0_MS = 1_780_000_000_000
HOUR_MS = 3_600_000
MILK = InventoryKey(MERCHANT, "milk", STORE)
EGGS = InventoryKey(MERCHANT, "eggs", STORE)


class Store:
    """A partition that keeps its records, to replay them and restore from a checkpoint."""

    def __init__(self) -> None:
        self.partition = Partition(PARTITION)
        self.records: list[Record] = []
        self.now_ms = T0_MS
        self.next_id = 0
        self.sent: dict[str, int] = {}

    def apply(self, command: inventory_core.Command) -> inventory_core.Outcome:
        step = self.partition.apply(command)
        for record in step.records:
            data = json.loads(json.dumps(command_to_data(record.command)))
            assert command_from_data(data) == record.command
        self.records.extend(step.records)
        self.partition.check_invariants()
        self.last_events = step.events
        return step.outcome

    def tick(self) -> int:
        self.now_ms += 1000
        return self.now_ms

    def expect(self, delivery_id: str, lines: tuple[Line, ...], eta_ms: int) -> object:
        self.next_id += 1
        command = ExpectDelivery(
            MERCHANT, f"asn-{self.next_id}", delivery_id, STORE, lines, eta_ms, self.tick()
        )
        return self.apply(command)

    def receipt(self, event_id: str, key: InventoryKey, units: int, delivery_id: str) -> object:
        occurred_ms = self.sent.setdefault(event_id, self.now_ms)  # sent again: the same event
        event = FeedEvent(
            event_id,
            FeedEventKind.RECEIPT,
            key,
            occurred_ms,
            quantity=units,
            delivery_id=delivery_id,
        )
        return self.apply(Ingest(MERCHANT, "supplier", (event,), self.tick()))

    def level(self, key: InventoryKey) -> inventory_core.StockLevel:
        (level,) = self.partition.levels([key], self.now_ms)
        return level

    def check_replay_and_restore(self) -> None:
        replayed = Partition(PARTITION)
        for record in self.records:
            replayed.replay(record)
        assert replayed.snapshot() == self.partition.snapshot()
        self.partition.checkpoint_failed()
        delta = self.partition.take_checkpoint()
        tables = {
            name: [
                (
                    TABLES[name].key_from_data(json.loads(json.dumps(TABLES[name].key_to_data(k)))),
                    TABLES[name].row_from_data(json.loads(json.dumps(TABLES[name].row_to_data(r)))),
                )
                for k, r in changes.upserts
            ]
            for name, changes in delta.tables.items()
        }
        restored = Partition.restore(PARTITION, self.partition.head_lsn, tables)
        restored.check_invariants()
        assert restored.snapshot() == self.partition.snapshot()


@pytest.fixture
def store() -> Store:
    shop = Store()
    shop.apply(SetStock(MILK, "take-milk", 10, None, shop.tick()))
    return shop


def test_a_notice_shows_incoming_units_and_eta_and_is_never_available(store: Store) -> None:
    eta_ms = T0_MS + 5 * HOUR_MS
    outcome = store.expect("d1", (Line(MILK, 24), Line(EGGS, 12)), eta_ms)
    assert isinstance(outcome, DeliveryExpected)
    assert [(lv.key, lv.incoming, lv.incoming_eta_ms) for lv in outcome.levels] == [
        (MILK, 24, eta_ms),
        (EGGS, 12, eta_ms),
    ]
    assert {e.reason for e in store.last_events} == {ChangeReason.INCOMING}
    eggs = store.level(EGGS)  # a SKU not stocked yet: its row exists, with nothing on hand
    assert (eggs.exists, eggs.on_hand, eggs.available, eggs.sellable) == (True, 0, 0, 0)
    refused = store.apply(Reserve(MERCHANT, "r1", (Line(MILK, 11),), 60, store.tick()))
    assert isinstance(refused, InsufficientStock), "incoming units are never promised online"
    store.check_replay_and_restore()


def test_deliveries_of_a_key_add_up_at_the_earliest_eta(store: Store) -> None:
    store.expect("late", (Line(MILK, 5),), T0_MS + 9 * HOUR_MS)
    store.expect("early", (Line(MILK, 7),), T0_MS + 2 * HOUR_MS)
    milk = store.level(MILK)
    assert (milk.incoming, milk.incoming_eta_ms) == (12, T0_MS + 2 * HOUR_MS)


def test_an_updated_notice_replaces_the_last_and_no_lines_cancels(store: Store) -> None:
    store.expect("d1", (Line(MILK, 24), Line(EGGS, 12)), T0_MS + HOUR_MS)
    store.expect("d1", (Line(MILK, 30),), T0_MS + 2 * HOUR_MS)
    assert (store.level(MILK).incoming, store.level(EGGS).incoming) == (30, 0)
    assert store.level(MILK).incoming_eta_ms == T0_MS + 2 * HOUR_MS
    store.expect("d1", (), 0)
    assert store.level(MILK).incoming == 0 and store.level(MILK).incoming_eta_ms == 0
    assert store.partition.snapshot().tables["deliveries"] == {}
    store.check_replay_and_restore()


def test_receipts_naming_the_delivery_turn_it_into_on_hand(store: Store) -> None:
    store.expect("d1", (Line(MILK, 24), Line(EGGS, 12)), T0_MS + HOUR_MS)
    store.receipt("rc-1", MILK, 20, "d1")
    milk = store.level(MILK)
    assert (milk.on_hand, milk.incoming) == (30, 4)
    (change,) = store.last_events  # one change: on_hand and incoming together
    assert change.reason is ChangeReason.RECEIPT
    # The same receipt again is a duplicate: it takes nothing off twice.
    again = store.receipt("rc-1", MILK, 20, "d1")
    assert isinstance(again, Ingested) and again.acks[0].status.value == "duplicate"
    assert store.level(MILK).incoming == 4
    # More than expected: the line is done, the surplus is on the shelf.
    store.receipt("rc-2", MILK, 9, "d1")
    assert (store.level(MILK).on_hand, store.level(MILK).incoming) == (39, 0)
    store.receipt("rc-3", EGGS, 12, "d1")
    assert store.partition.snapshot().tables["deliveries"] == {}, "all received: it is gone"
    store.check_replay_and_restore()


def test_a_receipt_a_count_already_covers_still_fulfils_its_delivery(store: Store) -> None:
    store.expect("d1", (Line(MILK, 24),), T0_MS + HOUR_MS)
    unloaded_ms = store.now_ms
    count = FeedEvent("count-1", FeedEventKind.COUNT, MILK, unloaded_ms + 500, count=34)
    store.apply(Ingest(MERCHANT, "pos", (count,), store.tick()))
    late = FeedEvent(
        "rc-1", FeedEventKind.RECEIPT, MILK, unloaded_ms, quantity=24, delivery_id="d1"
    )
    outcome = store.apply(Ingest(MERCHANT, "supplier", (late,), store.tick()))
    assert isinstance(outcome, Ingested) and outcome.acks[0].status.value == "superseded"
    milk = store.level(MILK)
    assert (milk.on_hand, milk.incoming) == (34, 0), "the count already has the units"
    store.check_replay_and_restore()


def test_a_receipt_of_a_delivery_not_expected_just_applies(store: Store) -> None:
    store.expect("d1", (Line(EGGS, 12),), T0_MS + HOUR_MS)
    store.receipt("rc-1", MILK, 5, "d1")  # d1 expects no milk
    store.receipt("rc-2", MILK, 5, "nope")  # no such delivery
    assert (store.level(MILK).on_hand, store.level(EGGS).incoming) == (20, 12)


def test_notices_and_receipts_are_refused_with_the_field(store: Store) -> None:
    def refused(command: inventory_core.Command) -> Invalid:
        outcome = store.apply(command)
        assert isinstance(outcome, Invalid), outcome
        return outcome

    elsewhere = InventoryKey(MERCHANT, "milk", "store-2")
    eta_ms = T0_MS + HOUR_MS
    cases = {
        "delivery_id": ExpectDelivery(MERCHANT, "k1", "", STORE, (Line(MILK, 1),), eta_ms, T0_MS),
        "eta_ms": ExpectDelivery(MERCHANT, "k2", "d", STORE, (Line(MILK, 1),), 0, T0_MS),
        "lines[0].quantity": ExpectDelivery(
            MERCHANT, "k3", "d", STORE, (Line(MILK, 0),), eta_ms, T0_MS
        ),
        "lines[1].key.sku_id": ExpectDelivery(
            MERCHANT, "k4", "d", STORE, (Line(MILK, 1), Line(MILK, 2)), eta_ms, T0_MS
        ),
        "lines[0].key.location_id": ExpectDelivery(
            MERCHANT, "k5", "d", STORE, (Line(elsewhere, 1),), eta_ms, T0_MS
        ),
    }
    for field, command in cases.items():
        assert refused(command).field == field
    sale = FeedEvent("s1", FeedEventKind.SALE, MILK, T0_MS, quantity=1, delivery_id="d1")
    outcome = store.apply(Ingest(MERCHANT, "pos", (sale,), store.tick()))
    assert isinstance(outcome, Ingested)
    assert (outcome.acks[0].field, outcome.acks[0].reason) == (
        "delivery_id",
        "only a receipt names a delivery, not a sale",
    )


def test_a_retried_notice_is_answered_from_idempotency(store: Store) -> None:
    command = ExpectDelivery(MERCHANT, "asn-x", "d1", STORE, (Line(MILK, 3),), T0_MS + 1, T0_MS)
    first = store.partition.apply(command)
    again = store.partition.apply(command)
    assert again.outcome == first.outcome and again.records == ()


def test_deliveries_beyond_the_bound_are_refused(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory_core._limits, "deliveries_max", 2)
    store.expect("d1", (Line(MILK, 1),), T0_MS + HOUR_MS)
    store.expect("d2", (Line(MILK, 1),), T0_MS + HOUR_MS)
    refused = store.expect("d3", (Line(MILK, 1),), T0_MS + HOUR_MS)
    assert refused == CapacityExhausted("deliveries_max", 2)
    updated = store.expect("d2", (Line(MILK, 5),), T0_MS + HOUR_MS)  # a known one may change
    assert isinstance(updated, DeliveryExpected)
    assert store.level(MILK).incoming == 6
