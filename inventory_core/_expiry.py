"""The expiry index: which live reservations are due, in expiry order.

A heap of ``(expires_at_ms, reservation_id)`` plus each live reservation's current expiry.
Extending a reservation pushes a new entry and leaves the old one stale; a finished
reservation leaves its entry stale too. Stale entries are skipped when met, and the heap is
rebuilt from the current expiries whenever stale entries outnumber both the live ones and
``expiry_heap_stale_entries_min``: so the heap holds at most twice the live reservations
plus that slack, whatever the pattern of extends.

Pops are in ``(expires_at_ms, reservation_id)`` order, a total order, so live apply and
replay expire the same reservations in the same records however the heap is shaped.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from . import _limits as limits


class ExpiryIndex:
    __slots__ = ("_expires_at_ms", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._expires_at_ms: dict[str, int] = {}

    def __len__(self) -> int:
        """Live reservations indexed."""
        return len(self._expires_at_ms)

    @property
    def heap_entries(self) -> int:
        return len(self._heap)

    def set(self, reservation_id: str, expires_at_ms: int) -> None:
        """Index a live reservation at its (new) expiry."""
        if self._expires_at_ms.get(reservation_id) == expires_at_ms:
            return
        self._expires_at_ms[reservation_id] = expires_at_ms
        heapq.heappush(self._heap, (expires_at_ms, reservation_id))
        self._compact_if_stale()

    def discard(self, reservation_id: str) -> None:
        """A reservation finished: it is no longer due, ever."""
        if self._expires_at_ms.pop(reservation_id, None) is not None:
            self._compact_if_stale()

    def next_due_ms(self) -> int | None:
        """When the earliest live reservation expires."""
        heap = self._heap
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now_ms: int, batch_max: int) -> Iterator[tuple[str, ...]]:
        """Due reservation ids in expiry order, in batches of at most ``batch_max``.

        Popped ids stay indexed until ``discard``: the expiry record that finishes them
        does that.
        """
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            # A dict: an expiry set back to a value it had leaves two current entries.
            batch: dict[str, None] = {}
            while heap and heap[0][0] <= now_ms and len(batch) < batch_max:
                entry = heapq.heappop(heap)
                if self._current(entry):
                    batch[entry[1]] = None
            if batch:
                yield tuple(batch)

    def due(self, now_ms: int) -> list[str]:
        """Live reservations due at now_ms, without popping them (for reads).

        Walks only the due part of the heap: a node later than now_ms has no due children.
        """
        heap = self._heap
        found: dict[str, None] = {}
        pending = [0] if heap else []
        while pending:
            index = pending.pop()
            entry = heap[index]
            if entry[0] > now_ms:
                continue
            if self._current(entry):
                found[entry[1]] = None
            pending.extend(i for i in (2 * index + 1, 2 * index + 2) if i < len(heap))
        return list(found)

    def _current(self, entry: tuple[int, str]) -> bool:
        return self._expires_at_ms.get(entry[1]) == entry[0]

    def _compact_if_stale(self) -> None:
        live = len(self._expires_at_ms)
        stale = len(self._heap) - live
        if stale > max(live, limits.expiry_heap_stale_entries_min):
            self._heap = [(at, rid) for rid, at in self._expires_at_ms.items()]
            heapq.heapify(self._heap)

    def check(self) -> None:
        """The heap's bound, and every live reservation findable in it."""
        live = len(self._expires_at_ms)
        assert len(self._heap) <= 2 * live + limits.expiry_heap_stale_entries_min + 1
        current = {rid for at, rid in self._heap if self._expires_at_ms.get(rid) == at}
        assert current == set(self._expires_at_ms), "a live reservation is missing from the heap"
