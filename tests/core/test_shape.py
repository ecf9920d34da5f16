"""The mechanisms under the rules: the registry, the tables, the expiry index, the
per-process bounds and the entry-point validators (DESIGN section 3, STYLE habits 4 and 10)."""

from __future__ import annotations

import typing

import pytest

import inventory_core._limits as limits_module
from inventory_core import (
    REGISTRY,
    TABLES,
    CapacityExhausted,
    Command,
    ExpectDelivery,
    Expire,
    Extend,
    FeedEvent,
    FeedEventKind,
    Ingest,
    Invalid,
    InventoryKey,
    Line,
    Partition,
    ProcessUsage,
    QuotaSent,
    ReceiveQuota,
    Record,
    Reserve,
    SendQuota,
    SetStock,
    SplitKey,
    bucket_key,
    limits,
    partition_of,
    validate_read,
    validate_watch_filter,
)
from inventory_core._expiry import ExpiryIndex

M, L = "m1", "l1"
P = partition_of(M, L)
T0 = 1_700_000_000_000


def key(sku: str) -> InventoryKey:
    return InventoryKey(M, sku, L)


# ------------------------------------------------------------------------------ registry


def test_every_command_type_has_exactly_one_registry_row_with_today_s_names() -> None:
    assert {row.type for row in REGISTRY} == set(typing.get_args(Command))
    # The names are the ledger's `kind` column: records already written carry them.
    assert [row.name for row in REGISTRY] == [
        "reserve",
        "commit",
        "release",
        "extend",
        "adjust_stock",
        "set_stock",
        "set_safety_stock",
        "expire",
        "ingest",
        "expect_delivery",
        "mark_stale",
        "split_key",
        "merge_key",
        "send_quota",
        "receive_quota",
        "settle_transfer",
    ]
    assert [row.name for row in REGISTRY if not row.from_caller] == ["expire", "mark_stale"]


def test_every_table_round_trips_its_keys_and_rows_through_its_schema() -> None:
    partition = Partition(P)
    partition.apply(SetStock(key("a"), "s", 5, None, T0))
    partition.apply(Reserve(M, "r", (Line(key("a"), 2),), 60, T0 + 1))
    sale = FeedEvent("e1", FeedEventKind.SALE, key("a"), T0, quantity=1)
    partition.apply(Ingest(M, "pos", (sale,), T0 + 2))
    partition.on_timer(T0 + 2 + limits.feed_silence_stale_ms)  # a stale location, stale rows
    later = T0 + 3 + limits.feed_silence_stale_ms
    partition.apply(ExpectDelivery(M, "asn", "d1", L, (Line(key("a"), 4),), later + 60_000, later))
    # A hot key's split at its home and, here too, one of its buckets with a return in transit
    # (the core does not mind which partition a bucket is in; the shell routes it).
    partition.apply(SplitKey(key("a"), "split", (1,), later))
    sent = partition.apply(SendQuota(key("a"), "grant", bucket_key(key("a"), 1), 1, later))
    assert isinstance(sent.outcome, QuotaSent), sent.outcome
    partition.apply(ReceiveQuota(sent.outcome.transfer, later))
    partition.apply(SendQuota(bucket_key(key("a"), 1), "return", key("a"), 1, later))
    snapshot = partition.snapshot()
    assert snapshot.stock[key("a")].stale_since_ms
    assert set(snapshot.tables) == set(TABLES)
    for name, rows in snapshot.tables.items():
        schema = TABLES[name]
        assert rows, name
        for k, row in rows.items():
            assert schema.key_from_data(schema.key_to_data(k)) == k
            assert schema.row_from_data(schema.row_to_data(row)) == row


# --------------------------------------------------------------------------- expiry index


def test_expiry_heap_stays_within_twice_live_plus_slack_however_often_extended() -> None:
    index = ExpiryIndex()
    for i in range(10):
        index.set(f"r{i}", T0 + i)
    for round_number in range(10 * limits.expiry_heap_stale_entries_min):
        index.set(f"r{round_number % 10}", T0 + 1000 + round_number)  # an extend each time
        assert index.heap_entries <= 2 * len(index) + limits.expiry_heap_stale_entries_min + 1
    index.check()
    assert len(index) == 10


def test_extends_leave_the_partition_s_heap_bounded() -> None:
    partition = Partition(P)
    partition.apply(SetStock(key("a"), "s", 5, None, T0))
    reserved = partition.apply(Reserve(M, "r", (Line(key("a"), 1),), 60, T0)).outcome
    reservation_id = reserved.reservation.reservation_id  # type: ignore[union-attr]
    for i in range(3 * limits.expiry_heap_stale_entries_min):
        partition.apply(Extend(M, f"e{i}", reservation_id, 60 + i % 100, T0 + i))
    partition.check_invariants()  # includes the heap's bound


def test_expiry_set_back_to_an_old_value_is_due_once() -> None:
    index = ExpiryIndex()
    index.set("r1", T0 + 10)
    index.set("r1", T0 + 20)
    index.set("r1", T0 + 10)  # two heap entries now say T0 + 10 for r1
    assert index.due(T0 + 30) == ["r1"]
    assert list(index.pop_due(T0 + 30, 100)) == [("r1",)]


# ------------------------------------------------------------------------ process bounds


def test_process_bounds_refuse_past_the_total_of_every_attached_partition() -> None:
    usage = ProcessUsage(keys_max=3, reservations_live_max=2, idempotency_entries_max=100)
    first, second = Partition(P), Partition(partition_of(M, "l2"))
    first.attach(usage)
    second.attach(usage)
    first.apply(SetStock(key("a"), "s1", 5, None, T0))
    first.apply(SetStock(key("b"), "s2", 5, None, T0))
    other = InventoryKey(M, "a", "l2")
    second.apply(SetStock(other, "s3", 5, None, T0))
    assert usage.keys == 3
    refused = second.apply(SetStock(InventoryKey(M, "b", "l2"), "s4", 5, None, T0)).outcome
    assert refused == CapacityExhausted("process_keys_max", 3)
    # An existing key is not a new one: still changes.
    assert first.apply(SetStock(key("a"), "s5", 6, None, T0)).records
    first.apply(Reserve(M, "r1", (Line(key("a"), 1),), 60, T0))
    second.apply(Reserve(M, "r2", (Line(other, 1),), 60, T0))
    assert usage.reservations_live == 2
    third = first.apply(Reserve(M, "r3", (Line(key("b"), 1),), 60, T0)).outcome
    assert third == CapacityExhausted("process_reservations_live_max", 2)
    # Dropping a partition gives its share back.
    second.detach()
    assert (usage.keys, usage.reservations_live) == (2, 1)
    assert first.apply(Reserve(M, "r4", (Line(key("b"), 1),), 60, T0)).records
    first.check_invariants()
    second.check_invariants()


def test_process_idempotency_bound_refuses_new_keys_but_answers_retries() -> None:
    usage = ProcessUsage(idempotency_entries_max=1)
    partition = Partition(P)
    partition.attach(usage)
    first = SetStock(key("a"), "s1", 5, None, T0)
    accepted = partition.apply(first).outcome
    assert partition.apply(SetStock(key("a"), "s2", 6, None, T0)).outcome == CapacityExhausted(
        "process_idempotency_entries_max", 1
    )
    assert partition.apply(first).outcome == accepted


def test_replay_is_never_refused_by_process_bounds() -> None:
    live = Partition(P)
    step = live.apply(SetStock(key("a"), "s1", 5, None, T0))
    full = ProcessUsage(keys=10, keys_max=1, idempotency_entries=10, idempotency_entries_max=1)
    replica = Partition(P)
    replica.attach(full)
    for record in step.records:
        replica.replay(Record(record.partition, record.lsn, record.command))
    assert replica.snapshot() == live.snapshot()
    assert (full.keys, full.idempotency_entries) == (11, 11)


def _sales(key: InventoryKey, *event_ids: str, count: int | None = None) -> Ingest:
    """One Ingest of a sale per event id at ``key`` (led by a count, if given)."""
    events = [FeedEvent(f"c-{event_ids[0]}", FeedEventKind.COUNT, key, T0, 0, count, "", "")]
    events = events if count is not None else []
    events += [
        FeedEvent(e, FeedEventKind.SALE, key, T0 + 1 + i, 1, None, "", "")
        for i, e in enumerate(event_ids)
    ]
    return Ingest(key.merchant_id, "pos", tuple(events), T0 + 1000, "", ())


def test_process_feed_facts_bound_refuses_an_ingest_whole_but_never_the_service() -> None:
    usage = ProcessUsage(feed_facts_max=3)
    first, second = Partition(P), Partition(partition_of(M, "l2"))
    first.attach(usage)
    second.attach(usage)
    assert first.apply(_sales(key("a"), "e1", count=10)).records  # a count and a sale
    other = InventoryKey(M, "a", "l2")
    assert second.apply(_sales(other, "e2")).records
    assert usage.feed_facts == 3
    before = first.snapshot()
    step = first.apply(_sales(key("a"), "e3"))
    assert step.outcome == CapacityExhausted("process_feed_facts_max", 3)
    assert not step.records and first.snapshot() == before  # nothing of it applied
    # The service's own physical facts are never refused; a SetStock replaces the history.
    assert first.apply(SetStock(key("a"), "s1", 7, None, T0 + 2000)).records
    assert usage.feed_facts == 2
    # Accepted again (recorded, superseded: it occurred before the SetStock, so not kept).
    assert first.apply(_sales(key("a"), "e3")).records
    assert usage.feed_facts == 2
    # Dropping a partition gives its facts back.
    second.detach()
    assert usage.feed_facts == 1  # and its private usage counts its own (the invariants)
    first.check_invariants()
    second.check_invariants()


def test_replay_is_never_refused_by_the_feed_facts_bound() -> None:
    live = Partition(P)
    step = live.apply(_sales(key("a"), "e1", "e2", count=5))
    full = ProcessUsage(feed_facts=10, feed_facts_max=1)
    replica = Partition(P)
    replica.attach(full)
    for record in step.records:
        replica.replay(Record(record.partition, record.lsn, record.command))
    assert replica.snapshot() == live.snapshot()
    assert full.feed_facts == 13
    replica.check_invariants()


def test_process_bounds_fit_in_a_machine() -> None:
    # The figures behind _limits.py's comment: ~0.26 KiB a key, ~1.3 KiB a live reservation,
    # ~0.45 KiB an entry (tracemalloc over 20,000 of each), ~0.2 KiB a feed fact (over
    # 100,000); the total stays under 8 GiB.
    total_kib = (
        0.26 * limits.process_keys_max
        + 1.3 * limits.process_reservations_live_max
        + 0.45 * limits.process_idempotency_entries_max
        + 0.2 * limits.process_feed_facts_max
    )
    assert total_kib < 8 * 1024 * 1024
    assert limits.process_keys_max >= limits.partition_keys_max


def test_per_partition_bounds_still_hold_under_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "partition_keys_max", 1)
    partition = Partition(P)
    partition.attach(ProcessUsage())
    partition.apply(SetStock(key("a"), "s1", 5, None, T0))
    refused = partition.apply(SetStock(key("b"), "s2", 5, None, T0)).outcome
    assert refused == CapacityExhausted("partition_keys_max", 1)


# ------------------------------------------------------------------ entry-point validators


def test_reads_are_validated_by_the_same_identifier_rules_as_reserve() -> None:
    assert validate_read([key("a")]) is None
    assert validate_read([]) == Invalid("keys", f"1 to {limits.availability_keys_max} keys, got 0")
    bad = validate_read([key("a"), InventoryKey(M, "a b", L)])
    assert bad is not None and bad.field == "keys[1].sku_id"
    too_many = [key(str(i)) for i in range(limits.availability_keys_max + 1)]
    assert validate_read(too_many) is not None
    assert validate_read(too_many[:-1]) is None


def test_watch_filters_refuse_ids_that_reserve_refuses() -> None:
    def check(merchant: str, locations: list[str], skus: list[str]) -> Invalid | None:
        return validate_watch_filter(merchant, locations, skus, location_ids_max=2, sku_ids_max=3)

    assert check(M, [L], ["a"]) is None
    assert check("", [], []) == Invalid("merchant_id", "must not be empty")
    spaced = check(M, ["l 1"], [])
    assert spaced is not None and spaced.field == "location_ids[0]"
    unicode = check(M, [], ["a", "café"])
    assert unicode is not None and unicode.field == "sku_ids[1]"
    assert check(M, ["a", "b", "c"], []) == Invalid("location_ids", "at most 2, got 3")
    assert check(M, [], ["a", "b", "c"]) is None
    long_id = "x" * (limits.identifier_length_max + 1)
    too_long = check(M, [long_id], [])
    assert too_long is not None and too_long.field == "location_ids[0]"
    assert check(M, ["x" * limits.identifier_length_max], []) is None


def test_expire_needs_no_validation_and_refuses_nothing() -> None:
    assert Partition(P).apply(Expire((), T0)).records == ()


def test_an_adjustment_without_a_reason_is_the_core_s_refusal() -> None:
    from inventory_core import AdjustStock

    command = AdjustStock(key("a"), "a1", 1, None, T0, T0)
    refused = Partition(P).apply(command).outcome
    assert isinstance(refused, Invalid) and refused.field == "reason"
