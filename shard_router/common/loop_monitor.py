"""How long the event loop was held: the stall every caller of the process waited out.

A task asks to wake every ``period_s`` and measures how late it woke. Anything that holds
the loop (a long synchronous step, a full garbage collection, a huge encode) shows up as
lateness; the stats line reports the worst since the previous line and how many wake-ups
were later than ``STALL_S``. The cost is one timer wake-up per period. The collector's own
pauses are timed too (``gc.callbacks``), so a stall can be told apart from a collection.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass
from typing import Any

# A loop held longer than this is a stall worth counting: it is the per-call latency budget
# the service is held to at its p99 (issue targets: no shard loop stall over 50 ms).
STALL_S = 0.050


@dataclass(slots=True)
class LoopFigures:
    stall_max_s: float = 0.0
    stalls: int = 0
    gc_pause_max_s: float = 0.0
    gc_pause_total_s: float = 0.0
    gc_full_collections: int = 0  # of the oldest generation


class LoopMonitor:
    def __init__(self, period_s: float = 0.010) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be positive")
        self.period_s = period_s
        self._figures = LoopFigures()
        self._gc_started = 0.0

    async def run(self) -> None:
        """Until cancelled."""
        gc.callbacks.append(self._collected)
        try:
            while True:
                asked = time.monotonic()
                await asyncio.sleep(self.period_s)
                late = time.monotonic() - asked - self.period_s
                figures = self._figures
                figures.stall_max_s = max(figures.stall_max_s, late)
                if late > STALL_S:
                    figures.stalls += 1
        finally:
            gc.callbacks.remove(self._collected)

    def _collected(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
            return
        pause = time.monotonic() - self._gc_started
        figures = self._figures
        figures.gc_pause_max_s = max(figures.gc_pause_max_s, pause)
        figures.gc_pause_total_s += pause
        if info.get("generation") == 2:
            figures.gc_full_collections += 1

    def take(self) -> LoopFigures:
        """The figures since the previous call, which start afresh."""
        figures, self._figures = self._figures, LoopFigures()
        return figures

    def take_fields(self) -> dict[str, float | int]:
        """``take`` as stats-line fields."""
        figures = self.take()
        return {
            "loop_stall_max_ms": round(1000 * figures.stall_max_s, 1),
            "loop_stalls_over_50ms": figures.stalls,
            "gc_pause_max_ms": round(1000 * figures.gc_pause_max_s, 1),
            "gc_pause_total_ms": round(1000 * figures.gc_pause_total_s, 1),
            "gc_full_collections": figures.gc_full_collections,
        }
