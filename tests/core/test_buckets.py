"""Hot keys' buckets (DESIGN section 10): split, transfers, merge, each rule by its name.

The interleavings of all of them, with transfers carried late, twice or never, are the
stateful test's (``test_buckets_stateful.py``).
"""

from __future__ import annotations

import pytest

from inventory_core import (
    AckStatus,
    CapacityExhausted,
    Commit,
    Committed,
    FeedEvent,
    FeedEventKind,
    IdempotencyKeyReused,
    Ingest,
    Ingested,
    InsufficientStock,
    Invalid,
    InventoryKey,
    KeySplit,
    Line,
    MergeKey,
    QuotaReceived,
    QuotaSent,
    ReceiveQuota,
    Release,
    Reserve,
    Reserved,
    SendQuota,
    SetSafetyStock,
    SetStock,
    SettleTransfer,
    ShortLine,
    SplitConflict,
    SplitKey,
    Transfer,
    TransferSettled,
    bucket_key,
    limits,
)

from .hot_cluster import Cluster, bucket_numbers_apart, partition_of_key

HOT = InventoryKey("m1", "viral", "store-1")
OTHER = InventoryKey("m1", "plain", "store-1")
NUMBERS = bucket_numbers_apart(HOT, 3)
B1, B2, B3 = (bucket_key(HOT, n) for n in NUMBERS)


def split_cluster(on_hand: int, buckets: int = 2) -> Cluster:
    cluster = Cluster()
    cluster.apply(HOT, SetStock(HOT, "stock", on_hand, None, cluster.tick()))
    step = cluster.apply(HOT, SplitKey(HOT, "split", NUMBERS[:buckets], cluster.tick()))
    assert isinstance(step.outcome, KeySplit), step.outcome
    return cluster


def send(cluster: Cluster, source: InventoryKey, target: InventoryKey, quantity: int) -> Transfer:
    key = f"send-{cluster.tick()}"
    step = cluster.apply(source, SendQuota(source, key, target, quantity, cluster.now_ms))
    assert isinstance(step.outcome, QuotaSent), step.outcome
    return step.outcome.transfer


def carry(cluster: Cluster, transfer: Transfer) -> QuotaReceived:
    """Credit at the target, then settle at the source: the rebalancer's two calls."""
    step = cluster.apply(transfer.target, ReceiveQuota(transfer, cluster.tick()))
    assert isinstance(step.outcome, QuotaReceived), step.outcome
    settled = cluster.apply(
        transfer.source, SettleTransfer(transfer.source, transfer.transfer_id, cluster.tick())
    )
    assert settled.outcome == TransferSettled(transfer.transfer_id, settled=True)
    return step.outcome


def grant(cluster: Cluster, bucket: InventoryKey, quantity: int) -> None:
    carry(cluster, send(cluster, HOT, bucket, quantity))


def reserve(cluster: Cluster, key: InventoryKey, quantity: int) -> Reserved | InsufficientStock:
    now = cluster.tick()
    step = cluster.apply(key, Reserve("m1", f"reserve-{now}", (Line(key, quantity),), 600, now))
    assert isinstance(step.outcome, Reserved | InsufficientStock), step.outcome
    return step.outcome


def reserved_id(cluster: Cluster, key: InventoryKey, quantity: int) -> str:
    outcome = reserve(cluster, key, quantity)
    assert isinstance(outcome, Reserved), outcome
    return outcome.reservation.reservation_id


# ------------------------------------------------------------------------------ split


def test_buckets_sit_in_partitions_of_their_own() -> None:
    partitions = {partition_of_key(k) for k in (HOT, B1, B2, B3)}
    assert len(partitions) == 4


def test_a_split_records_its_buckets_and_moves_no_units() -> None:
    cluster = Cluster()
    cluster.apply(HOT, SetStock(HOT, "stock", 10, None, cluster.tick()))
    step = cluster.apply(HOT, SplitKey(HOT, "split", NUMBERS[:2], cluster.tick()))
    assert step.outcome == KeySplit(
        cluster.partition(HOT).levels([HOT], cluster.now_ms)[0], (B1, B2), step.records[0].lsn
    )
    assert cluster.row(HOT).offered == 10 and cluster.row(HOT).allotted == 0
    assert step.events == ()
    cluster.check()


def test_splitting_a_key_with_no_row_creates_it_empty() -> None:
    cluster = Cluster()
    step = cluster.apply(HOT, SplitKey(HOT, "split", NUMBERS[:1], cluster.tick()))
    assert isinstance(step.outcome, KeySplit) and step.outcome.level.exists
    assert cluster.row(HOT).on_hand == 0
    cluster.check()


def test_splitting_a_split_key_keeps_its_buckets_and_stops_its_merge() -> None:
    cluster = split_cluster(10)
    grant(cluster, B1, 3)
    merging = cluster.apply(HOT, MergeKey(HOT, "merge", cluster.tick())).outcome
    assert isinstance(merging, KeySplit) and merging.merging
    again = cluster.apply(HOT, SplitKey(HOT, "split-2", NUMBERS[2:], cluster.tick())).outcome
    assert isinstance(again, KeySplit)
    assert (again.buckets, again.merging) == ((B1, B2), False)
    cluster.check()


# ------------------------------------------------------------------------------ grants


def test_a_grant_takes_only_what_the_home_offers() -> None:
    cluster = split_cluster(10)
    cluster.apply(HOT, SetSafetyStock(HOT, "safety", 2, None, cluster.tick()))
    reserved_id(cluster, HOT, 3)
    now = cluster.tick()
    refused = cluster.apply(HOT, SendQuota(HOT, "too-much", B1, 6, now)).outcome
    assert refused == InsufficientStock((ShortLine(HOT, 6, 5),))
    transfer = send(cluster, HOT, B1, 5)
    assert (cluster.row(HOT).allotted, cluster.row(HOT).offered) == (5, 0)
    assert transfer.quantity == 5 and transfer.consumed == ()
    cluster.check()


def test_a_bucket_admits_reservations_up_to_its_quota_and_no_more() -> None:
    cluster = split_cluster(10)
    grant(cluster, B1, 4)
    reserved_id(cluster, B1, 3)
    assert reserve(cluster, B1, 2) == InsufficientStock((ShortLine(B1, 2, 1),))
    reserved_id(cluster, B1, 1)
    assert cluster.row(B1).offered == 0 and cluster.row(HOT).offered == 6
    cluster.check()


def test_a_credit_carried_twice_counts_once() -> None:
    cluster = split_cluster(10)
    transfer = send(cluster, HOT, B1, 4)
    first = cluster.apply(B1, ReceiveQuota(transfer, cluster.tick()))
    again = cluster.apply(B1, ReceiveQuota(transfer, cluster.tick()))
    assert again.outcome == first.outcome and again.records == ()
    assert cluster.row(B1).on_hand == 4
    cluster.check()


def test_settling_twice_changes_nothing_the_second_time() -> None:
    cluster = split_cluster(10)
    transfer = send(cluster, HOT, B1, 4)
    carry(cluster, transfer)
    step = cluster.apply(HOT, SettleTransfer(HOT, transfer.transfer_id, cluster.tick()))
    assert step.outcome == TransferSettled(transfer.transfer_id, settled=False)
    assert step.records == ()


def test_transfers_not_yet_settled_are_bounded() -> None:
    cluster = split_cluster(1000)
    for _ in range(limits.quota_transfers_pending_max):
        send(cluster, HOT, B1, 1)
    now = cluster.tick()
    refused = cluster.apply(HOT, SendQuota(HOT, "one-more", B1, 1, now)).outcome
    assert refused == CapacityExhausted(
        "quota_transfers_pending_max", limits.quota_transfers_pending_max
    )
    cluster.check()


# ------------------------------------------------------------------------------ returns


def test_a_return_gives_back_free_units_and_reports_commits_at_their_time() -> None:
    cluster = split_cluster(10)
    grant(cluster, B1, 6)
    held = reserved_id(cluster, B1, 4)
    committed_at = cluster.tick()
    # The caller names the key it knows (the home); the bucket's reservation holds the bucket.
    step = cluster.apply(B1, Commit("m1", "commit", held, (Line(HOT, 3),), committed_at))
    assert isinstance(step.outcome, Committed), step.outcome
    assert step.outcome.reservation.committed_lines == (Line(B1, 3),)
    assert cluster.row(HOT).on_hand == 10  # the home has not heard yet
    transfer = send(cluster, B1, HOT, 2)
    assert (transfer.quantity, transfer.consumed_units) == (2, 3)
    assert transfer.consumed[0].occurred_at_ms == committed_at
    received = carry(cluster, transfer)
    home = cluster.row(HOT)
    assert (home.on_hand, home.allotted, home.offered) == (7, 1, 6)
    assert received.level.on_hand == 7
    assert cluster.row(B1).on_hand == 1
    cluster.check()
    cluster.check_replay()


def test_a_return_with_nothing_in_it_is_a_split_conflict() -> None:
    cluster = split_cluster(10)
    grant(cluster, B1, 2)
    reserved_id(cluster, B1, 2)
    refused = cluster.apply(B1, SendQuota(B1, "empty", HOT, 0, cluster.tick())).outcome
    assert isinstance(refused, SplitConflict) and refused.key == B1
    assert cluster.apply(B1, SendQuota(B1, "held", HOT, 1, cluster.tick())).outcome == (
        InsufficientStock((ShortLine(B1, 1, 0),))
    )


def test_a_count_at_the_home_after_a_bucket_commit_does_not_count_it_twice() -> None:
    cluster = split_cluster(10)
    grant(cluster, B1, 5)
    held = reserved_id(cluster, B1, 2)
    cluster.apply(B1, Commit("m1", "commit", held, (), cluster.tick()))
    # The shelf is counted after the pick: 8 units. The bucket reports its commit later.
    cluster.apply(HOT, SetStock(HOT, "count", 8, None, cluster.tick()))
    carry(cluster, send(cluster, B1, HOT, 0))
    assert cluster.row(HOT).on_hand == 8
    cluster.check()


def test_a_count_before_a_bucket_commit_is_moved_by_it() -> None:
    cluster = split_cluster(10)
    grant(cluster, B1, 5)
    held = reserved_id(cluster, B1, 2)
    count = FeedEvent("count-1", FeedEventKind.COUNT, HOT, cluster.tick(), count=9)
    cluster.apply(B1, Commit("m1", "commit", held, (), cluster.tick()))
    # A till's count taken before the pick arrives after it: the pick still moves on_hand.
    cluster.apply(HOT, Ingest("m1", "pos", (count,), cluster.tick()))
    carry(cluster, send(cluster, B1, HOT, 0))
    assert cluster.row(HOT).on_hand == 7
    cluster.check()


def test_a_sale_at_the_till_lands_at_the_home_and_can_leave_its_offer_below_zero() -> None:
    cluster = split_cluster(10)
    grant(cluster, B1, 8)
    sale = FeedEvent("sale-1", FeedEventKind.SALE, HOT, cluster.tick(), quantity=5)
    cluster.apply(HOT, Ingest("m1", "pos", (sale,), cluster.tick()))
    home = cluster.row(HOT)
    assert (home.on_hand, home.available, home.offered) == (5, 5, -3)
    # Not over-committed: units allotted are not promised yet; the rebalancer takes them back.
    carry(cluster, send(cluster, B1, HOT, 3))
    assert cluster.row(HOT).offered == 0
    cluster.check()


# ------------------------------------------------------------------------------ merge


def test_a_merge_waits_for_every_unit_and_the_split_goes_with_the_last() -> None:
    cluster = split_cluster(10)
    grant(cluster, B1, 4)
    grant(cluster, B2, 3)
    held = reserved_id(cluster, B1, 2)
    merging = cluster.apply(HOT, MergeKey(HOT, "merge", cluster.tick())).outcome
    assert isinstance(merging, KeySplit) and merging.merging
    refused = cluster.apply(HOT, SendQuota(HOT, "grant", B2, 1, cluster.tick())).outcome
    assert isinstance(refused, SplitConflict)
    carry(cluster, send(cluster, B2, HOT, 3))
    carry(cluster, send(cluster, B1, HOT, 2))
    cluster.apply(B1, Release("m1", "release", held, cluster.tick()))
    last = carry(cluster, send(cluster, B1, HOT, 2))
    assert last.merged
    whole = cluster.apply(HOT, MergeKey(HOT, "merge-again", cluster.tick())).outcome
    assert whole == KeySplit(cluster.partition(HOT).levels([HOT], cluster.now_ms)[0])
    assert (cluster.row(HOT).on_hand, cluster.row(HOT).allotted) == (10, 0)
    cluster.check()
    cluster.check_replay()


def test_merging_a_split_whose_buckets_hold_nothing_is_at_once() -> None:
    cluster = split_cluster(10)
    step = cluster.apply(HOT, MergeKey(HOT, "merge", cluster.tick()))
    assert step.outcome == KeySplit(cluster.partition(HOT).levels([HOT], cluster.now_ms)[0])
    cluster.check()


# ------------------------------------------------------------------------- kept refusals


def test_a_kept_refusal_is_recorded_and_a_retry_gets_it_again() -> None:
    """The router's walk over a hot key's buckets: a bucket that refused says so again to a
    retry, even once it has units, and says it was kept, so the retry goes on to the bucket
    that took them (whether or not the retry asked to keep it)."""
    cluster = split_cluster(10)
    grant(cluster, B1, 1)
    lines = (Line(B1, 2),)
    first = cluster.apply(B1, Reserve("m1", "order-7", lines, 600, cluster.tick(), True))
    assert first.outcome == InsufficientStock((ShortLine(B1, 2, 1),), kept=True)
    assert len(first.records) == 1 and first.events == ()
    grant(cluster, B1, 5)
    retry = cluster.apply(B1, Reserve("m1", "order-7", lines, 600, cluster.tick(), False))
    assert retry.outcome == first.outcome and retry.records == ()
    assert cluster.row(B1).reserved == 0
    other = cluster.apply(B1, Reserve("m1", "order-7", (Line(B1, 1),), 600, cluster.tick(), True))
    assert isinstance(other.outcome, IdempotencyKeyReused)
    cluster.check()
    cluster.check_replay()


def test_a_refusal_not_asked_to_be_kept_leaves_nothing() -> None:
    cluster = split_cluster(10)
    step = cluster.apply(B1, Reserve("m1", "order-8", (Line(B1, 1),), 600, cluster.tick()))
    assert isinstance(step.outcome, InsufficientStock) and step.records == ()
    assert not step.outcome.kept
    grant(cluster, B1, 1)
    assert isinstance(
        cluster.apply(B1, Reserve("m1", "order-8", (Line(B1, 1),), 600, cluster.tick())).outcome,
        Reserved,
    )


# ------------------------------------------------------------------------------ shape


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (SetStock(B1, "set", 5, None, 1), "key.location_id"),
        (SplitKey(HOT, "split", (), 1), "buckets"),
        (SplitKey(HOT, "split", (1, 1), 1), "buckets"),
        (SplitKey(HOT, "split", (limits.bucket_number_max + 1,), 1), "buckets[0]"),
        (SendQuota(HOT, "send", OTHER, 1, 1), "target"),
        (SendQuota(B1, "send", B2, 1, 1), "target"),
        (SendQuota(HOT, "send", B1, 0, 1), "quantity"),
        (ReceiveQuota(Transfer("x1", HOT, B1, 1, 1), 1), "transfer.transfer_id"),
        (ReceiveQuota(Transfer("t0001-0000000001", HOT, B1, 1, 0), 1), "transfer"),
    ],
)
def test_malformed_hot_key_commands_name_the_field(command: object, field: str) -> None:
    cluster = Cluster()
    step = cluster.apply(HOT, command)  # type: ignore[arg-type]
    assert isinstance(step.outcome, Invalid) and step.outcome.field == field, step.outcome


def test_a_caller_cannot_name_a_bucket_for_a_physical_fact() -> None:
    sale = FeedEvent("sale-1", FeedEventKind.SALE, B1, 1, quantity=1)
    cluster = split_cluster(10)
    step = cluster.apply(B1, Ingest("m1", "pos", (sale,), cluster.tick()))
    assert isinstance(step.outcome, Ingested), step.outcome
    (ack,) = step.outcome.acks
    assert (ack.status, ack.field) == (AckStatus.REFUSED, "key.location_id"), ack
    assert step.records == ()
