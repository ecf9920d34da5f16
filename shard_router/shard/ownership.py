"""Which partitions this shard owns: the ring over live members, enforced by epochs.

Two loops, so that neither waits behind the other:
  - heartbeats, every ``poll_s``: refresh our membership row, drop the partitions whose
    epoch moved on (another owner took them while we were away), and extend the lease the
    owner trusts itself for;
  - rebalances, every ``poll_s``: read the live members, compute the ring (rebuilt only when
    the members change), and
      - drop the partitions the ring gives to someone else (their new owner bumps the
        epoch, so anything this process still tries to flush for them is refused);
      - take the partitions the ring gives to it: epoch bump (fencing the previous owner),
        then recovery from checkpoint + ledger, then serving.
A takeover may wait on the database (a paused previous owner's locks, a long recovery):
our heartbeats go on meanwhile, so others never count us dead for it.
A shard whose heartbeat lapsed (it was paused, or cut off from the database) is not in the
live set: it owns nothing until its next heartbeat puts it back on the ring.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from inventory_core import Partition

from ..ring import Ring
from .owner import Owner

log = structlog.get_logger(__name__)


class MemberLike(Protocol):
    @property
    def shard_id(self) -> str: ...


class MembershipSource(Protocol):
    async def heartbeat(self, shard_id: str, address: str) -> None: ...
    async def alive(self) -> Sequence[MemberLike]: ...
    async def leave(self, shard_id: str) -> None: ...


class OwnedLike(Protocol):
    @property
    def partition(self) -> int: ...
    @property
    def epoch(self) -> int: ...


class PartitionSource(Protocol):
    async def acquire(self, partitions: Sequence[int], owner: str) -> Sequence[OwnedLike]: ...
    async def load(self, partitions: Sequence[int]) -> dict[int, Partition]: ...
    async def epochs(self, partitions: Sequence[int]) -> dict[int, int]: ...


@dataclass(frozen=True, slots=True)
class OwnershipLimits:
    # How often membership is read and the heartbeat written: a new or dead member is acted
    # on within about poll_s after its lease says so.
    poll_s: float = 0.5
    # Others count us dead lease_s after our last heartbeat; we stop acting as owner after
    # this fraction of it (measured from before the heartbeat was sent), leaving room for
    # clock-rate drift and a slow poll.
    lease_trust_fraction: float = 0.5


class Ownership:
    def __init__(
        self,
        owner: Owner,
        membership: MembershipSource,
        partitions: PartitionSource,
        *,
        shard_id: str,
        address: str,
        partition_count: int,
        lease_s: float,
        limits: OwnershipLimits | None = None,
        on_acquired: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        self._lease_s = lease_s
        # Told of partitions just taken, before they serve (the event publisher catches up).
        self._on_acquired = on_acquired
        self._owner = owner
        self._membership = membership
        self._partitions = partitions
        self.shard_id = shard_id
        self._address = address
        self._partition_count = partition_count
        self.limits = limits or OwnershipLimits()
        self.ring_version = ""
        self.rebalances = 0
        # Partitions taken and being loaded (checkpoint and ledger tail) right now: not yet
        # owned, so not in the owner's figures (the metrics read it).
        self.loading = 0
        self._ring: Ring | None = None
        self._ring_members: tuple[str, ...] = ()

    async def run(self, first_pass_done: asyncio.Event | None = None) -> None:
        """A heartbeat and a rebalance first (then ``first_pass_done`` is set), then both
        loops until cancelled. A database that is away is retried at the next poll."""
        await self._survive(self.heartbeat, "heartbeat")
        await self._survive(self.rebalance, "ownership_poll")
        if first_pass_done is not None:
            first_pass_done.set()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._every_poll(self.heartbeat, "heartbeat"))
            group.create_task(self._every_poll(self.rebalance, "ownership_poll"))

    async def _every_poll(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        while True:
            await asyncio.sleep(self.limits.poll_s)
            await self._survive(step, name)

    @staticmethod
    async def _survive(step: Callable[[], Awaitable[None]], name: str) -> None:
        try:
            await step()
        except Exception as error:  # the database is away: keep what we have, retry
            log.warning(f"{name}_failed", error=repr(error))

    async def heartbeat(self) -> None:
        """Stay alive, give up what others took, and trust ourselves for a while longer."""
        sent_at = time.monotonic()
        await self._membership.heartbeat(self.shard_id, self._address)
        await self._drop_fenced()
        self._owner.lease_valid_until = sent_at + self._lease_s * self.limits.lease_trust_fraction

    async def rebalance(self) -> None:
        members = tuple(sorted(m.shard_id for m in await self._membership.alive()))
        if self.shard_id not in members:
            members = ()  # our lease lapsed: own nothing until we are back
        ring = self._ring_of(members)
        wanted = set(ring.partitions_of(self.shard_id)) if ring else set()
        owned = set(self._owner.owned_partitions)
        drop = sorted(owned - wanted)
        take = sorted(wanted - owned - set(self._owner.recovering_partitions))
        if ring is not None and ring.version != self.ring_version:
            log.info("ring_changed", version=ring.version, members=list(members))
            self.ring_version = ring.version
        if drop:
            self._owner.drop(drop)
            log.info("partitions_dropped", count=len(drop))
        if take:
            started = time.monotonic()
            self.loading = len(take)
            try:
                acquired = await self._partitions.acquire(take, self.shard_id)
                loaded = await self._partitions.load(take)
            finally:
                self.loading = 0
            epochs = {o.partition: o.epoch for o in acquired}
            if self._on_acquired is not None:
                self._on_acquired(take)
            self._owner.adopt(loaded, epochs)
            self.rebalances += 1
            log.info(
                "partitions_taken", count=len(take), recovery_s=round(time.monotonic() - started, 3)
            )

    def _ring_of(self, members: tuple[str, ...]) -> Ring | None:
        """The ring over these members, reused while they stay the same."""
        if not members:
            return None
        if self._ring is None or self._ring_members != members:
            self._ring = Ring(members, partition_count=self._partition_count)
            self._ring_members = members
        return self._ring

    async def _drop_fenced(self) -> None:
        """Partitions whose epoch moved on were taken by another owner while we were away."""
        owned = self._owner.owned_partitions
        if not owned:
            return
        current = await self._partitions.epochs(owned)
        fenced = [p for p in owned if current.get(p) != self._owner.epoch_of(p)]
        if fenced:
            self._owner.drop(fenced)
            log.warning("partitions_fenced", count=len(fenced), partitions=fenced[:20])

    async def leave(self) -> None:
        await self._membership.leave(self.shard_id)
