"""The rebalancer's plan (``shard_router.router.rebalancer.plan``): pure, so tested alone."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from inventory_core import InventoryKey, bucket_key
from shard_router.router.rebalancer import Move, Part, plan

HOME = InventoryKey("m-1", "viral", "store-1")
BUCKETS = [bucket_key(HOME, n) for n in (1, 2, 3)]


def applied(home: Part, buckets: list[Part], moves: list[Move]) -> dict[InventoryKey, int]:
    """Each part's offer after the moves, checking each debit against what its source
    offers at that moment (as the core does)."""
    offers = {home.key: home.offered, **{b.key: b.offered for b in buckets}}
    for move in moves:
        assert move.quantity >= 0
        assert move.quantity == 0 or move.quantity <= offers[move.source], move
        assert HOME in (move.source, move.target), move  # through the home only
        offers[move.source] -= move.quantity
        offers[move.target] += move.quantity
    return offers


def test_a_fresh_split_is_spread_evenly_from_the_home() -> None:
    home, buckets = Part(HOME, 60), [Part(b, 0) for b in BUCKETS[:2]]
    moves = plan(home, buckets, merging=False)
    assert moves == [Move(HOME, BUCKETS[0], 20), Move(HOME, BUCKETS[1], 20)]


def test_a_rich_bucket_gives_back_and_a_poor_one_is_granted() -> None:
    home, buckets = Part(HOME, 0), [Part(BUCKETS[0], 30), Part(BUCKETS[1], 0)]
    offers = applied(home, buckets, plan(home, buckets, merging=False))
    assert offers == {HOME: 10, BUCKETS[0]: 10, BUCKETS[1]: 10}


def test_units_sold_at_the_till_are_taken_back_from_the_richest_buckets() -> None:
    home, buckets = Part(HOME, -5), [Part(BUCKETS[0], 10), Part(BUCKETS[1], 2)]
    offers = applied(home, buckets, plan(home, buckets, merging=False))
    assert offers[HOME] >= 0 and sum(offers.values()) == 7


def test_a_bucket_reports_its_commits_even_with_nothing_to_give_back() -> None:
    home, buckets = Part(HOME, 10), [Part(BUCKETS[0], 10, committed=3)]
    assert plan(home, buckets, merging=False) == [Move(BUCKETS[0], HOME, 0)]


def test_merging_brings_every_free_unit_home() -> None:
    home = Part(HOME, 1)
    buckets = [Part(BUCKETS[0], 7), Part(BUCKETS[1], 0, committed=2), Part(BUCKETS[2], 0)]
    assert plan(home, buckets, merging=True) == [
        Move(BUCKETS[0], HOME, 7),
        Move(BUCKETS[1], HOME, 0),
    ]


@settings(max_examples=300, deadline=None)
@given(
    home=st.integers(-20, 200),
    offers=st.lists(st.integers(0, 200), min_size=1, max_size=3),
    committed=st.lists(st.integers(0, 5), min_size=3, max_size=3),
)
def test_a_plan_moves_only_free_units_and_leaves_every_part_near_its_share(
    home: int, offers: list[int], committed: list[int]
) -> None:
    buckets = [Part(BUCKETS[i], o, committed[i]) for i, o in enumerate(offers)]
    moves = plan(Part(HOME, home), buckets, merging=False)
    after = applied(Part(HOME, home), buckets, moves)
    assert sum(after.values()) == home + sum(offers)  # nothing created or lost
    total = max(home, 0) + sum(offers)
    share = total // (len(offers) + 1)
    slack = max(1, share // 10)
    if home >= 0:
        # A rich bucket keeps at most its slack above the share; a poor one is short at most
        # by what the rich ones kept (each within its slack) and the rounding of the share.
        for bucket in buckets:
            assert after[bucket.key] <= max(bucket.offered, share + slack), bucket
            assert after[bucket.key] >= share - len(buckets) * slack - 1, (bucket, after)
    for bucket in buckets:  # commits always reported
        if bucket.committed:
            assert any(m.source == bucket.key for m in moves)
