"""Watch's view of a split key (``SplitTotals``): one key, its parts added up, its version
only going up, and no bucket ever shown as a key of its own."""

from __future__ import annotations

from inventory.v1 import events_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import InventoryKey, bucket_key, partition_of
from shard_router.common.convert import key_to_proto
from shard_router.router.hot_keys import SplitView
from shard_router.router.watch_totals import SplitTotals

HOME = InventoryKey("m1", "viral", "store-1")
B1, B2 = bucket_key(HOME, 1), bucket_key(HOME, 2)
OTHER = InventoryKey("m1", "calm", "store-1")


def level(key: InventoryKey, version: int, on_hand: int, **counts: int) -> pb.StockLevel:
    """A part's level: available follows from on_hand, reserved and safety stock."""
    reserved, safety, allotted = (counts.get(n, 0) for n in ("reserved", "safety", "allotted"))
    available = on_hand - reserved - safety
    return pb.StockLevel(
        key=key_to_proto(key),
        on_hand=on_hand,
        reserved=reserved,
        safety_stock=safety,
        available=available,
        sellable=max(available - allotted, 0),
        allotted=allotted,
        version=version,
        exists=True,
    )


def change(
    key: InventoryKey, version: int, on_hand: int, **counts: int
) -> events_pb2.AvailabilityChanged:
    found = level(key, version, on_hand, **counts)
    after = events_pb2.StockCounts(
        on_hand=found.on_hand,
        reserved=found.reserved,
        safety_stock=found.safety_stock,
        available=found.available,
        sellable=found.sellable,
        allotted=found.allotted,
    )
    return events_pb2.AvailabilityChanged(
        key=found.key,
        version=version,
        after=after,
        reason="reservation",
        partition=partition_of(key.merchant_id, key.location_id),
        lsn=version * 10,
        committed_at_ms=5_000 + version,
    )


def split(*levels: pb.StockLevel) -> SplitView:
    view = SplitView(HOME, (HOME, B1, B2), generation=7, merging=False)
    for found in levels:
        view.note(
            InventoryKey(found.key.merchant_id, found.key.sku_id, found.key.location_id), found
        )
    return view


def read_alone(
    totals: SplitTotals, event: events_pb2.AvailabilityChanged
) -> events_pb2.AvailabilityChanged | None:
    """What subscribers see of one change read alone: itself, the total it moved, or None."""
    passed = totals.take(event)
    if passed is not None:
        return passed
    moved = totals.flush()
    assert len(moved) <= 1, moved
    return moved[0][1] if moved else None


def followed() -> SplitTotals:
    """100 units at the home, 40 granted to each bucket (B1's reservation holds 5)."""
    totals = SplitTotals(1024)
    shown = totals.follow(
        [split(level(HOME, 10, 100, allotted=80), level(B1, 3, 40, reserved=5), level(B2, 2, 40))]
    )
    assert [(p, c.version) for p, c in shown] == [(partition_of("m1", "store-1"), 15)]
    return totals


def test_a_buckets_change_is_shown_as_its_homes_total() -> None:
    totals = followed()
    shown = read_alone(totals, change(B2, 3, 40, reserved=12))
    assert shown is not None
    assert shown.key == key_to_proto(HOME)
    assert (shown.after.on_hand, shown.after.reserved, shown.after.available) == (100, 17, 83)
    assert (shown.after.sellable, shown.after.allotted, shown.parts) == (83, 0, 3)
    assert shown.version == 10 + 3 + 3
    assert shown.before.reserved == 5  # the total shown before
    # The cause's position and times: a shopper can tell how old the change is.
    assert (shown.partition, shown.lsn, shown.committed_at_ms) == (
        partition_of(B2.merchant_id, B2.location_id),
        30,
        5_003,
    )


def test_a_commit_at_a_bucket_leaves_the_shelf_before_its_return_reports_it() -> None:
    totals = followed()
    # B1 commits its 5: its on_hand and reserved drop; the home still counts the 5 allotted.
    shown = read_alone(totals, change(B1, 4, 35))
    assert shown is not None
    assert (shown.after.on_hand, shown.after.reserved, shown.after.sellable) == (95, 0, 95)


def test_buckets_are_never_shown_as_keys_of_their_own() -> None:
    totals = SplitTotals(1024)
    assert read_alone(totals, change(B1, 1, 5)) is None  # a split this router does not know yet
    stray = bucket_key(OTHER, 1)
    totals = followed()
    assert read_alone(totals, change(stray, 1, 5)) is None
    assert totals.level(level(B1, 9, 40)) is None
    assert totals.replayed(change(B1, 9, 40)) is None
    calm = change(OTHER, 4, 9)
    assert read_alone(totals, calm) is calm
    assert totals.replayed(calm) is calm


def test_a_part_learnt_late_never_moves_the_total_back() -> None:
    totals = followed()
    assert read_alone(totals, change(B1, 5, 30, reserved=2)) is not None
    assert read_alone(totals, change(B1, 4, 35)) is None  # older than what is known of B1
    # A refresh bringing an older level of B1 changes nothing either.
    again = totals.follow(
        [split(level(HOME, 10, 100, allotted=80), level(B1, 4, 35), level(B2, 2, 40))]
    )
    assert again == []


def test_the_version_goes_on_up_across_a_merge() -> None:
    totals = followed()
    last = read_alone(totals, change(B2, 6, 0))
    assert last is not None and last.version == 10 + 3 + 6
    # The last unit comes home: allotted 0, the home's version absorbed the buckets'.
    merged = read_alone(totals, change(HOME, 11 + 3 + 6, 100))
    assert merged is not None and merged.version == 20 > last.version
    assert (merged.after.on_hand, merged.after.sellable, merged.parts) == (100, 100, 0)
    # The split is gone from the map: the home's changes pass as they are, still above.
    totals.follow([])
    plain = change(HOME, 21, 99)
    assert read_alone(totals, plain) is plain
    assert totals.partitions() == frozenset()


def test_a_snapshot_shows_the_total_and_a_resume_sends_it_afresh() -> None:
    totals = followed()
    shown = totals.level(level(HOME, 10, 100, allotted=80))
    assert shown is not None
    assert (shown.on_hand, shown.reserved, shown.sellable, shown.version) == (100, 5, 95, 15)
    assert (shown.allotted, shown.parts, shown.exists) == (0, 3, True)
    assert totals.replayed(change(HOME, 10, 100, allotted=80)) is None
    current = totals.totals(lambda key: key.location_id == "store-1")
    assert [(c.key.sku_id, c.version, c.after.sellable) for c in current] == [("viral", 15, 95)]
    assert totals.totals(lambda key: key.location_id == "store-2") == []


def test_the_buckets_partitions_are_followed() -> None:
    totals = followed()
    assert totals.partitions() == {partition_of(b.merchant_id, b.location_id) for b in (B1, B2)}


def test_a_read_s_changes_of_one_key_add_up_to_one_total_caused_by_the_latest() -> None:
    totals = followed()
    for version, reserved in ((4, 6), (5, 7), (6, 9)):
        assert totals.take(change(B1, version, 40, reserved=reserved)) is None
    assert totals.take(change(B2, 3, 40, reserved=1)) is None
    calm = change(OTHER, 2, 9)
    assert totals.take(calm) is calm  # any other key passes as it is, at once
    [(partition, total)] = totals.flush()
    assert partition == partition_of("m1", "store-1")
    assert (total.after.reserved, total.version) == (9 + 1, 10 + 6 + 3)
    assert (total.lsn, total.before.reserved) == (30, 5)  # B2's, the latest taken
    assert totals.flush() == []
