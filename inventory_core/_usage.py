"""What the partitions of one process hold together, against the per-process bounds.

The shell makes one ``ProcessUsage`` per process and attaches every partition it adopts; a
partition counts its own keys, live reservations and idempotency entries into it as they
change, and its handlers refuse new ones (``CapacityExhausted``, nothing applied) once the
process total reaches its bound. Replay never refuses: what was accepted once is applied
again whatever the totals. A partition not attached counts into a private usage, so the
core alone behaves as before.
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
    keys_max: int = limits.process_keys_max
    reservations_live_max: int = limits.process_reservations_live_max
    idempotency_entries_max: int = limits.process_idempotency_entries_max

    def add(self, keys: int, reservations_live: int, idempotency_entries: int) -> None:
        self.keys += keys
        self.reservations_live += reservations_live
        self.idempotency_entries += idempotency_entries

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
