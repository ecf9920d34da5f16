"""What the partitions of one process hold together, against the per-process bounds.

The shell makes one ``ProcessUsage`` per process and attaches every partition it adopts; a
partition counts its own keys, live reservations, idempotency entries and feed facts (the
deltas and counts its keys' histories keep) into it as they change, and its handlers refuse
new ones (``CapacityExhausted``, nothing applied) once the process total reaches its bound.
Replay never refuses: what was accepted once is applied again whatever the totals. A
partition not attached counts into a private usage, so the core alone behaves as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _limits as limits
from ._outcomes import CapacityExhausted


@dataclass(slots=True)
class ProcessUsage:
    keys: int = 0
    reservations_live: int = 0
    idempotency_entries: int = 0
    feed_facts: int = 0
    keys_max: int = limits.process_keys_max
    reservations_live_max: int = limits.process_reservations_live_max
    idempotency_entries_max: int = limits.process_idempotency_entries_max
    feed_facts_max: int = limits.process_feed_facts_max

    def add(
        self, keys: int, reservations_live: int, idempotency_entries: int, feed_facts: int
    ) -> None:
        self.keys += keys
        self.reservations_live += reservations_live
        self.idempotency_entries += idempotency_entries
        self.feed_facts += feed_facts

    def refuse_key(self, pending: int = 0) -> CapacityExhausted | None:
        """A new key, ``pending`` more already promised by the record being decided."""
        if self.keys + pending >= self.keys_max:
            return CapacityExhausted("process_keys_max", self.keys_max)
        return None

    def refuse_reservation(self) -> CapacityExhausted | None:
        if self.reservations_live >= self.reservations_live_max:
            return CapacityExhausted("process_reservations_live_max", self.reservations_live_max)
        return None

    def refuse_idempotency_entry(self) -> CapacityExhausted | None:
        if self.idempotency_entries >= self.idempotency_entries_max:
            limit = self.idempotency_entries_max
            return CapacityExhausted("process_idempotency_entries_max", limit)
        return None

    def refuse_feed_facts(self) -> CapacityExhausted | None:
        """An Ingest, once the histories hold this many facts (it may add up to
        ``limits.ingest_events_max`` past the bound: the check is per command)."""
        if self.feed_facts >= self.feed_facts_max:
            return CapacityExhausted("process_feed_facts_max", self.feed_facts_max)
        return None
