"""The router's view of the cluster: live members, the ring over them, a stream per shard.

``refresh`` reads membership (at most every ``refresh_interval_s_min`` unless forced by a
redirect) and rebuilds the ring; every shard address gets one long-lived ``Inventory.Batch``
stream (``StreamBatcher``) that carries the calls of all concurrent callers to that shard.
The router holds no stock state: a wrong view only costs a redirect and a retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import structlog

from ..client._batcher import StreamBatcher
from ..ring import Ring

log = structlog.get_logger(__name__)


class MemberLike(Protocol):
    @property
    def shard_id(self) -> str: ...
    @property
    def address(self) -> str: ...


MembershipReader = Callable[[], Awaitable[Sequence[MemberLike]]]


@dataclass(frozen=True, slots=True)
class RoutingLimits:
    # A redirect forces a refresh, but not more often than this: a burst of redirects after a
    # membership change costs one read, not thousands.
    refresh_interval_s_min: float = 0.1
    # Background refresh period, so new members are seen without a redirect.
    refresh_interval_s: float = 1.0


class Routes:
    def __init__(
        self,
        read_members: MembershipReader,
        partition_count: int,
        limits: RoutingLimits | None = None,
    ) -> None:
        self._read_members = read_members
        self._partition_count = partition_count
        self.limits = limits or RoutingLimits()
        self._ring: Ring | None = None
        self._addresses: dict[str, str] = {}
        self._batchers: dict[str, StreamBatcher] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Lock = asyncio.Lock()

    @property
    def ring_version(self) -> str:
        return self._ring.version if self._ring else ""

    def address_of(self, partition: int) -> str | None:
        if self._ring is None:
            return None
        return self._addresses.get(self._ring.owner_of(partition))

    def batcher(self, address: str) -> StreamBatcher:
        batcher = self._batchers.get(address)
        if batcher is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
            batcher = StreamBatcher(channel)
            self._batchers[address] = batcher
        return batcher

    async def refresh(self, force: bool = False) -> None:
        async with self._refreshing:
            since = time.monotonic() - self._refreshed_at
            if since < (
                self.limits.refresh_interval_s_min if force else self.limits.refresh_interval_s
            ):
                return
            members = await self._read_members()
            self._refreshed_at = time.monotonic()
            addresses = {m.shard_id: m.address for m in members}
            ring = (
                Ring(sorted(addresses), partition_count=self._partition_count)
                if addresses
                else None
            )
            if (ring.version if ring else "") != self.ring_version:
                log.info(
                    "ring_changed", version=ring.version if ring else "", members=sorted(addresses)
                )
            self._ring, self._addresses = ring, addresses
            for gone in set(self._batchers) - set(addresses.values()):
                await self._close(gone)

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:
                log.warning("membership_read_failed", error=repr(error))
            await asyncio.sleep(self.limits.refresh_interval_s)

    async def close(self) -> None:
        for address in list(self._batchers):
            await self._close(address)

    async def _close(self, address: str) -> None:
        batcher = self._batchers.pop(address)
        await batcher.close()
        await self._channels.pop(address).close()
