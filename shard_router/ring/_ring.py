"""The consistent-hash ring: which shard owns each partition (DESIGN section 4).

How it works. Every member (a shard id such as ``"shard-0"``) places
``virtual_nodes_per_member`` virtual nodes on a 64-bit circle, virtual node ``i`` of member
``m`` at the big-endian integer of the 8-byte blake2b digest of ``f"{m}#{i}"``. Partition
``p`` sits at the 8-byte blake2b digest of ``str(p)``, and its owner is the first virtual
node at or clockwise after that position (``bisect_left``, wrapping past the top of the
circle). Virtual nodes are ordered by ``(position, member)``, so even a 64-bit collision has
one answer, and nothing depends on the order the members were given in, on ``hash()`` or on
set order: every process with the same membership computes the same owners, and
``version`` (a digest of the sorted members, the virtual node count and the partition
count) lets two processes check that cheaply.

Bounds.
- Movement: adding a member moves exactly the partitions the new member now owns, and
  removing one moves exactly the partitions it owned; no other partition changes owner.
- Spread, measured: for N in 2..8 members with arbitrary names, every member owns within
  ±50% of P/N partitions (P = 1024). Over 10,000 random memberships per N, the worst
  member seen was 41% off (N = 8; 17% at N = 2), the 99.9th percentile of the worst member
  33%, its mean 15%; one member's standard deviation is 3.9% of P/N at N = 2 and 8.8% at
  N = 8, so 50% is 5.7 of them. The bound is statistical, not a guarantee for every set of
  names. The spread comes from the partitions, not the virtual nodes: with far more virtual
  nodes than partitions each partition's owner is close to an independent fair draw, so a
  member's count is close to Binomial(P, 1/N), whose standard deviation at N = 8 is
  already 8.3% of P/N. No virtual node count beats that floor; more of them only remove
  the arc-length noise on top of it (see ``VIRTUAL_NODES_PER_MEMBER``).
- Adding one member to N moves about P/(N + 1) partitions: the new member's share, so the
  spread bound above applies to it.

The ring is immutable: ``with_member`` and ``without_member`` return new rings, and
``moved_partitions(old, new)`` lists what a membership change hands over. Owners are computed
once, when the ring is built (O(N * V) hashes and a sort), so ``owner_of`` is a tuple index;
the owners of the last few memberships are kept (``_OWNERS_CACHED_MAX``), so building a ring
again for an unchanged membership costs a lookup.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
from collections.abc import Iterable

# The arc-length noise of a member's share has a relative standard deviation of about
# sqrt((N - 1) / (N * V)); at 1024 virtual nodes and N = 8 that is 2.9%, against the 8.3% of
# the partition draw that no virtual node count removes (module docstring), so the total is
# within 6% of that floor. 256 would leave 5.8% (total 10.1%), 4096 would gain under 0.5
# points and cost four times the hashing. Building a ring of 8 members hashes 8192 strings,
# about 10 ms, and happens only when membership changes.
VIRTUAL_NODES_PER_MEMBER = 1024

# DESIGN section 4 fixes P = 1024 (inventory_core.PARTITION_COUNT); repeated here because the
# ring may import only pure standard library modules. Callers pass the core's constant.
PARTITION_COUNT_DEFAULT = 1024

# Positions are 64-bit: collisions among thousands of virtual nodes are vanishingly rare and
# are broken by member name anyway.
_POSITION_DIGEST_BYTES = 8
# The version is compared, logged and sent in redirects: 64 bits tell memberships apart.
_VERSION_DIGEST_BYTES = 8
# A process uses one partition count; tests use a few more.
_PARTITION_POSITIONS_CACHED_MAX = 8
# Memberships whose owners are kept, so a ring rebuilt for a membership seen lately (every
# ownership poll of a shard, every refresh of a router, while nothing changes) costs a
# lookup instead of N * V hashes and a sort. The current membership and the few before it
# (a member leaving and coming back) are enough; each entry is one tuple of P references
# (8 KiB at P = 1024). The cache only finds owners computed before, from the same key, so
# the owners cannot depend on it (lookups hash the key with hash(); the owners never do).
_OWNERS_CACHED_MAX = 4


class NoMembers(LookupError):
    """The ring has no members, so no partition has an owner."""


class Ring:
    """An immutable membership and the owner of every partition under it."""

    __slots__ = ("_members", "_owners", "_partition_count", "_version", "_virtual_nodes")

    def __init__(
        self,
        members: Iterable[str],
        virtual_nodes_per_member: int = VIRTUAL_NODES_PER_MEMBER,
        partition_count: int = PARTITION_COUNT_DEFAULT,
    ) -> None:
        if isinstance(members, str):
            # A str is an Iterable[str]: Ring("shard-0") would make members "s", "h", ...
            raise TypeError("members must be a collection of shard ids, not one string")
        if virtual_nodes_per_member < 1:
            raise ValueError(f"virtual_nodes_per_member must be >= 1: {virtual_nodes_per_member}")
        if partition_count < 1:
            raise ValueError(f"partition_count must be >= 1: {partition_count}")
        self._members = _sorted_unique(members)
        self._virtual_nodes = virtual_nodes_per_member
        self._partition_count = partition_count
        self._owners = _owners(self._members, virtual_nodes_per_member, partition_count)
        self._version = _version(self._members, virtual_nodes_per_member, partition_count)

    @property
    def members(self) -> tuple[str, ...]:
        """The members, sorted."""
        return self._members

    @property
    def version(self) -> str:
        """16 hex digits, equal in every process that has the same membership and settings."""
        return self._version

    @property
    def virtual_nodes_per_member(self) -> int:
        return self._virtual_nodes

    @property
    def partition_count(self) -> int:
        return self._partition_count

    def owner_of(self, partition: int) -> str:
        """The member that owns ``partition``; ``NoMembers`` when the ring is empty."""
        if not 0 <= partition < self._partition_count:
            raise ValueError(f"partition {partition} outside 0..{self._partition_count - 1}")
        return self._owners_or_raise()[partition]

    def assignment(self) -> dict[int, str]:
        """Every partition's owner; ``NoMembers`` when the ring is empty."""
        return dict(enumerate(self._owners_or_raise()))

    def partitions_of(self, member: str) -> list[int]:
        """The partitions ``member`` owns, ascending; empty for a non-member."""
        return [p for p, owner in enumerate(self._owners) if owner == member]

    def with_member(self, member: str) -> Ring:
        """A new ring with ``member`` added; ``ValueError`` if it is already a member."""
        if member in self._members:
            raise ValueError(f"{member!r} is already a member")
        return Ring((*self._members, member), self._virtual_nodes, self._partition_count)

    def without_member(self, member: str) -> Ring:
        """A new ring with ``member`` removed; ``ValueError`` if it is not a member."""
        if member not in self._members:
            raise ValueError(f"{member!r} is not a member")
        remaining = [m for m in self._members if m != member]
        return Ring(remaining, self._virtual_nodes, self._partition_count)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return (self._members, self._virtual_nodes, self._partition_count) == (
            other._members,
            other._virtual_nodes,
            other._partition_count,
        )

    def __hash__(self) -> int:
        # Equal rings have equal versions; the digest keeps hash() out of the ring.
        return int(self._version, 16)

    def __repr__(self) -> str:
        return (
            f"Ring(members={self._members!r}, "
            f"virtual_nodes_per_member={self._virtual_nodes}, "
            f"partition_count={self._partition_count}, version={self._version!r})"
        )

    def _owners_or_raise(self) -> tuple[str, ...]:
        if not self._owners:
            raise NoMembers("the ring has no members, so no partition has an owner")
        return self._owners


def moved_partitions(old: Ring, new: Ring) -> list[int]:
    """The partitions whose owner differs between ``old`` and ``new``, ascending.

    Both rings must have members (``NoMembers`` otherwise) and the same partition count.
    """
    if old.partition_count != new.partition_count:
        raise ValueError(
            f"partition counts differ: {old.partition_count} and {new.partition_count}"
        )
    old_owners = old._owners_or_raise()
    new_owners = new._owners_or_raise()
    return [
        p for p, (was, now) in enumerate(zip(old_owners, new_owners, strict=True)) if was != now
    ]


def _sorted_unique(members: Iterable[str]) -> tuple[str, ...]:
    ordered = tuple(sorted(members))
    for member in ordered:
        if not member:
            raise ValueError("a member id must not be empty")
    for previous, member in itertools.pairwise(ordered):
        if previous == member:
            raise ValueError(f"{member!r} is listed more than once")
    return ordered


def _position(text: str) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=_POSITION_DIGEST_BYTES).digest()
    return int.from_bytes(digest, "big")


def _virtual_node_positions(member: str, count: int) -> list[int]:
    """``_position(f"{member}#{i}")`` for i in 0..count-1, hashing the shared prefix once.

    Copying the prefix state halves the cost of building a ring; the digests are identical.
    """
    prefix = hashlib.blake2b(f"{member}#".encode(), digest_size=_POSITION_DIGEST_BYTES)
    positions = []
    for i in range(count):
        state = prefix.copy()
        state.update(str(i).encode())
        positions.append(int.from_bytes(state.digest(), "big"))
    return positions


@functools.lru_cache(maxsize=_PARTITION_POSITIONS_CACHED_MAX)
def _partition_positions(partition_count: int) -> tuple[int, ...]:
    return tuple(_position(str(partition)) for partition in range(partition_count))


@functools.lru_cache(maxsize=_OWNERS_CACHED_MAX)
def _owners(
    members: tuple[str, ...], virtual_nodes_per_member: int, partition_count: int
) -> tuple[str, ...]:
    """Each partition's owner, indexed by partition; empty when there are no members."""
    if not members:
        return ()
    nodes = sorted(
        (position, member)
        for member in members
        for position in _virtual_node_positions(member, virtual_nodes_per_member)
    )
    positions = [position for position, _ in nodes]
    return tuple(
        nodes[bisect.bisect_left(positions, position) % len(nodes)][1]
        for position in _partition_positions(partition_count)
    )


def _version(members: tuple[str, ...], virtual_nodes_per_member: int, partition_count: int) -> str:
    # Length-prefixed, so no member name can imitate a separator.
    text = "".join(f"{len(member)}:{member}," for member in members)
    text += f"v{virtual_nodes_per_member},p{partition_count}"
    return hashlib.blake2b(text.encode(), digest_size=_VERSION_DIGEST_BYTES).hexdigest()
