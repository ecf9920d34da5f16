"""The load generator's own garbage-collector pauses, so a reader can see them in the report.

A pause that lands in a measured window delays every call in flight by as much, and shows in
the tail as if the server had been slow. Each generator process therefore collects and
freezes its heap before a phase starts (``gc.collect(); gc.freeze()``: the collector then
walks only what the phase allocates, which the spooled ledger keeps small) and records, with
``gc.callbacks``, every collection of the phase: how many per generation, the longest and the
total pause, counted inside the measured window and over the whole phase.

``GcPauses`` is a context manager: the callback is installed on entry and removed on exit
(with the freeze undone, so the next phase's collection sees everything again). The callback
does a clock read and a few additions: it is what runs inside the pause.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

GENERATIONS = (0, 1, 2)


@dataclass
class Tally:
    collections: int = 0
    pause_ms_total: float = 0.0
    pause_ms_max: float = 0.0

    def add(self, pause_ms: float) -> None:
        self.collections += 1
        self.pause_ms_total += pause_ms
        self.pause_ms_max = max(self.pause_ms_max, pause_ms)

    def figures(self) -> dict[str, float]:
        return {
            "collections": self.collections,
            "pause_ms_total": round(self.pause_ms_total, 3),
            "pause_ms_max": round(self.pause_ms_max, 3),
        }


@dataclass
class GcPauses:
    """Collections of this process between ``__enter__`` and ``__exit__``; those that end
    inside ``[measure_from, measure_to)`` (``time.monotonic``) also count as measured."""

    measure_from: float = 0.0
    measure_to: float = float("inf")
    measured: dict[int, Tally] = field(default_factory=lambda: {g: Tally() for g in GENERATIONS})
    whole: dict[int, Tally] = field(default_factory=lambda: {g: Tally() for g in GENERATIONS})
    frozen_objects: int = 0
    _started: float = 0.0

    def __enter__(self) -> GcPauses:
        gc.collect()
        gc.freeze()
        self.frozen_objects = gc.get_freeze_count()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        gc.callbacks.remove(self._callback)
        gc.unfreeze()

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._started = now
            return
        generation = int(info.get("generation", 2))
        pause_ms = (now - self._started) * 1000.0
        self.whole[generation].add(pause_ms)
        if self.measure_from <= now < self.measure_to:
            self.measured[generation].add(pause_ms)

    def figures(self) -> dict[str, Any]:
        """Picklable: per window, the totals and each generation's tally."""

        def window(tallies: dict[int, Tally]) -> dict[str, Any]:
            total = Tally()
            for tally in tallies.values():
                total.collections += tally.collections
                total.pause_ms_total += tally.pause_ms_total
                total.pause_ms_max = max(total.pause_ms_max, tally.pause_ms_max)
            return {
                **total.figures(),
                "by_generation": {str(g): t.figures() for g, t in tallies.items()},
            }

        return {
            "measured": window(self.measured),
            "phase": window(self.whole),
            "frozen_objects": self.frozen_objects,
        }
