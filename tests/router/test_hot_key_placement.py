"""Where the router puts a split key's buckets (``shard_router.router.hot_keys``)."""

from __future__ import annotations

from inventory_core import InventoryKey, bucket_key, partition_of
from shard_router.ring import Ring
from shard_router.router.hot_keys import bucket_numbers

KEY = InventoryKey("m-1", "viral", "store-1")


def _partition(key: InventoryKey) -> int:
    return partition_of(key.merchant_id, key.location_id)


def test_buckets_go_to_owners_none_of_the_key_s_parts_has() -> None:
    ring = Ring(("shard-0", "shard-1", "shard-2", "shard-3"), partition_count=1024)
    numbers = bucket_numbers(KEY, 3, ring.owner_of)
    owners = [ring.owner_of(_partition(k)) for k in (KEY, *(bucket_key(KEY, n) for n in numbers))]
    assert len(numbers) == 3 and len(set(owners)) == 4


def test_more_buckets_than_shards_get_partitions_of_their_own() -> None:
    ring = Ring(("shard-0", "shard-1"), partition_count=1024)
    numbers = bucket_numbers(KEY, 5, ring.owner_of)
    partitions = [_partition(k) for k in (KEY, *(bucket_key(KEY, n) for n in numbers))]
    assert len(numbers) == 5 and len(set(partitions)) == 6
    owners = {ring.owner_of(p) for p in partitions}
    assert owners == {"shard-0", "shard-1"}


def test_the_placement_is_the_same_for_the_same_ring() -> None:
    ring = Ring(("a", "b", "c"), partition_count=1024)
    first = bucket_numbers(KEY, 2, ring.owner_of)
    assert bucket_numbers(KEY, 2, ring.owner_of) == first


def test_with_no_owner_known_the_buckets_still_get_partitions_of_their_own() -> None:
    numbers = bucket_numbers(KEY, 3, lambda p: None)
    partitions = {_partition(bucket_key(KEY, n)) for n in numbers} | {_partition(KEY)}
    assert len(partitions) == 4
