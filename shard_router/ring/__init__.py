"""Which shard owns each partition: a pure consistent-hash ring with virtual nodes.

No IO, no clock, no randomness, no ``hash()``: every process with the same membership
computes the same owners and the same ``version``. How it works and its measured bounds
(every member within ±50% of P/N partitions for 2..8 members; adding a member moves only
the partitions it now owns) are in ``_ring``'s docstring. The public surface is exactly
``__all__`` (tests/ring/test_ring.py).

    ring = Ring(["shard-0", "shard-1"], partition_count=inventory_core.PARTITION_COUNT)
    ring.owner_of(partition)                       # "shard-1"
    grown = ring.with_member("shard-2")
    moved_partitions(ring, grown)                  # hand these to shard-2
"""

from __future__ import annotations

from ._ring import (
    PARTITION_COUNT_DEFAULT,
    VIRTUAL_NODES_PER_MEMBER,
    NoMembers,
    Ring,
    moved_partitions,
)

__all__ = [
    "PARTITION_COUNT_DEFAULT",
    "VIRTUAL_NODES_PER_MEMBER",
    "NoMembers",
    "Ring",
    "moved_partitions",
]
