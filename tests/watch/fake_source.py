"""An in-memory EventSource: capped streams per partition and a read view, with outages.

``write`` plays the shard and the publisher in one step: the key's version goes up by one,
its partition's lsn too, the entry ``{lsn}-0`` is appended (the oldest trimmed past
``stream_entries_max``) and the read view is updated in the same step, as the Redis script
does. While ``failing`` every call raises ConnectionError (writes still land: the outbox
republishes them once Redis is back). ``calls`` counts the calls by name and ``asked`` keeps
the partitions each ``read``, ``last_ids`` and ``first_ids`` call named, in order.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from inventory.v1 import events_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import PARTITION_COUNT, partition_of

Entry = tuple[tuple[int, int], str, events_pb2.AvailabilityChanged]


def parse(entry_id: str) -> tuple[int, int]:
    lsn, _, index = entry_id.partition("-")
    return int(lsn), int(index)


@dataclass
class FakeEventSource:
    stream_entries_max: int = 100_000
    partition_count: int = PARTITION_COUNT
    failing: bool = False
    streams: dict[int, list[Entry]] = field(default_factory=dict)
    view: dict[tuple[str, str, str], tuple[pb.StockLevel, int, int]] = field(default_factory=dict)
    lsns: dict[int, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    asked: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    now_ms: int = 1_000_000
    _appended: asyncio.Event | None = None

    # ---------------------------------------------------------------- the writer

    def write(
        self,
        merchant: str,
        sku: str,
        location: str,
        on_hand: int,
        *,
        reserved: int = 0,
        allotted: int = 0,
    ) -> int:
        """Set a key's on_hand (and reserved, and a hot key home's allotted); returns its new
        version."""
        partition = partition_of(merchant, location, self.partition_count)
        lsn = self.lsns.get(partition, 0) + 1
        self.lsns[partition] = lsn
        key = pb.InventoryKey(merchant_id=merchant, sku_id=sku, location_id=location)
        previous = self.view.get((merchant, sku, location))
        version = (previous[0].version if previous else 0) + 1
        before = events_pb2.StockCounts(on_hand=previous[0].on_hand if previous else 0)
        available = on_hand - reserved
        sellable = max(available - allotted, 0)
        after = events_pb2.StockCounts(
            on_hand=on_hand,
            reserved=reserved,
            available=available,
            sellable=sellable,
            allotted=allotted,
        )
        event = events_pb2.AvailabilityChanged(
            key=key,
            version=version,
            before=before,
            after=after,
            reason="set_stock",
            partition=partition,
            lsn=lsn,
            committed_at_ms=self.now_ms,
        )
        stream = self.streams.setdefault(partition, [])
        stream.append(((lsn, 0), f"{lsn}-0", event))
        del stream[: max(len(stream) - self.stream_entries_max, 0)]
        level = pb.StockLevel(
            key=key,
            on_hand=on_hand,
            reserved=reserved,
            available=available,
            sellable=sellable,
            allotted=allotted,
            version=version,
            exists=True,
        )
        self.view[(merchant, sku, location)] = (level, partition, lsn)
        if self._appended is not None:
            self._appended.set()
        return version

    def versions(self, merchant: str) -> dict[tuple[str, str], int]:
        return {(s, loc): lv[0].version for (m, s, loc), lv in self.view.items() if m == merchant}

    # ----------------------------------------------------------- the EventSource

    def _enter(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.failing:
            raise ConnectionError("redis down (fake)")

    async def snapshot(
        self, merchant_id: str, location_ids: Sequence[str], sku_ids: Sequence[str]
    ) -> list[tuple[pb.StockLevel, int, int]]:
        self._enter("snapshot")
        await asyncio.sleep(0)
        return [
            value
            for (merchant, sku, location), value in sorted(self.view.items())
            if merchant == merchant_id
            and (not location_ids or location in location_ids)
            and (not sku_ids or sku in sku_ids)
        ]

    def _ask(self, name: str, partitions: Sequence[int] | None) -> Sequence[int]:
        wanted = range(self.partition_count) if partitions is None else partitions
        self.asked.setdefault(name, []).append(tuple(wanted))
        self._enter(name)
        return wanted

    async def last_ids(self, partitions: Sequence[int] | None = None) -> dict[int, str]:
        wanted = self._ask("last_ids", partitions)
        await asyncio.sleep(0)
        return {p: s[-1][1] if (s := self.streams.get(p)) else "0-0" for p in wanted}

    async def first_ids(self, partitions: Sequence[int] | None = None) -> dict[int, str]:
        wanted = self._ask("first_ids", partitions)
        await asyncio.sleep(0)
        return {p: s[0][1] if (s := self.streams.get(p)) else "0-0" for p in wanted}

    async def read(
        self, positions: dict[int, str], block_ms: int, count: int
    ) -> list[tuple[int, str, events_pb2.AvailabilityChanged]]:
        positions = dict(positions)  # as the real reader encodes them before awaiting
        self._ask("read", list(positions))
        deadline_s = asyncio.get_running_loop().time() + block_ms / 1000
        while not (found := self._after(positions, count)):  # as XREAD BLOCK: wait for ours
            if self._appended is None:
                self._appended = asyncio.Event()
            self._appended.clear()
            try:
                async with asyncio.timeout_at(deadline_s):
                    await self._appended.wait()
            except TimeoutError:
                return []
            if self.failing:
                raise ConnectionError("redis down (fake)")
        return found

    async def range(
        self, partition: int, after_id: str, up_to_id: str, count: int
    ) -> list[tuple[int, str, events_pb2.AvailabilityChanged]]:
        self._enter("range")
        await asyncio.sleep(0)
        stream = self.streams.get(partition, [])
        start = bisect.bisect_right([e[0] for e in stream], parse(after_id))
        up_to = parse(up_to_id)
        return [(partition, i, ev) for e, i, ev in stream[start:] if e <= up_to][:count]

    def _after(
        self, positions: dict[int, str], count: int
    ) -> list[tuple[int, str, events_pb2.AvailabilityChanged]]:
        found: list[tuple[int, str, events_pb2.AvailabilityChanged]] = []
        for partition, stream in sorted(self.streams.items()):
            if partition not in positions:
                continue  # as XREAD: only the streams named
            start = bisect.bisect_right([e[0] for e in stream], parse(positions[partition]))
            found.extend((partition, i, ev) for _, i, ev in stream[start:][:count])
        return found
