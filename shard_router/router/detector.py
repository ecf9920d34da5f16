"""Which keys are hot: reservation rates per key, in bounded memory (DESIGN section 10).

The router counts the one-line Reserves it receives per key over a window of
``window_s``. A key whose rate reaches ``threshold_per_s`` is hot: the router splits it. A
split key whose rate stays below ``threshold_per_s * cool_share`` for ``cool_windows``
windows in a row has cooled: the router merges it back. (The gap between the two rates keeps
a key near the threshold from being split and merged over and over.)

The counts are a Space-Saving summary of at most ``keys_max`` keys, evicting in halves: when
a key not counted yet finds the summary full, the least counted half goes, and new keys start
from the highest count evicted (``_floor``). No count is below the truth, and a key whose
true count in the window exceeds twice the window's requests / ``keys_max`` is never evicted:
a hot key is never missed, and a key looks hotter than it is by at most the floor it started
from, far below any threshold worth splitting at. Evicting half at a time keeps a Reserve's
cost to a dict update (the sort runs once per ``keys_max / 2`` new keys). Each router sees
its share of the traffic: with R routers behind a balancer, a key is hot at R x the
threshold overall.

Pure: time arrives as an argument; the router's task calls ``start`` once, then ``roll``
once per window, and acts on the answer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from inventory_core import InventoryKey

# Keys one router counts per window. The hot ones are few; 1024 keeps every key above 1/1024
# of the traffic, at ~100 B a key.
KEYS_MAX = 1024


@dataclass(frozen=True, slots=True)
class DetectorLimits:
    # Reservations per second of one key, at this router, that make it hot. A Python owner
    # serialises ~10,000 one-line reserves a second (benchmarks/); a key at a tenth of that
    # already takes a tenth of its shard.
    threshold_per_s: float = 1000.0
    window_s: float = 2.0
    # A split key has cooled when its rate stays below this share of the threshold...
    cool_share: float = 0.25
    # ...for this many windows in a row (a minute at the default window).
    cool_windows: int = 30
    keys_max: int = KEYS_MAX

    def __post_init__(self) -> None:
        assert self.threshold_per_s > 0 and self.window_s > 0, self
        assert 0 < self.cool_share < 1 and self.cool_windows >= 1 and self.keys_max >= 1, self


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one window found: keys to split, and split keys to merge."""

    hot: tuple[InventoryKey, ...] = ()
    cooled: tuple[InventoryKey, ...] = ()
    # The busiest keys and their rates (per second), for the logs and metrics.
    top: tuple[tuple[InventoryKey, float], ...] = ()


@dataclass(slots=True)
class HotKeyDetector:
    limits: DetectorLimits = field(default_factory=DetectorLimits)
    _counts: dict[InventoryKey, int] = field(default_factory=dict)
    _floor: int = 0  # the highest count evicted this window
    _cool_for: dict[InventoryKey, int] = field(default_factory=dict)
    _window_started_s: float = 0.0
    # The busiest key's rate over the last window ended (the metrics read it).
    busiest_per_s: float = 0.0

    def count(self, key: InventoryKey) -> None:
        """One Reserve of ``key`` (Space-Saving: bounded by ``keys_max``)."""
        counts = self._counts
        if key in counts:
            counts[key] += 1
            return
        if len(counts) >= self.limits.keys_max:
            ranked = sorted(counts.items(), key=lambda item: item[1])
            evicted = ranked[: len(ranked) // 2 or 1]
            self._floor = max(self._floor, evicted[-1][1])
            self._counts = counts = dict(ranked[len(evicted) :])
        counts[key] = self._floor + 1

    def start(self, now_s: float) -> None:
        """The first window starts now (a rate is counted over the time it was counted in)."""
        self._window_started_s = now_s

    def roll(self, now_s: float, split: set[InventoryKey]) -> Verdict:
        """End the window at ``now_s``: the keys to split (hot, not ``split`` yet) and the
        ``split`` keys to merge (cooled), then start the next window."""
        elapsed_s = max(now_s - self._window_started_s, 1e-9)
        rates = {key: count / elapsed_s for key, count in self._counts.items()}
        limits = self.limits
        hot = tuple(sorted(k for k, r in rates.items() if r >= limits.threshold_per_s))
        cooled = []
        for key in sorted(split):
            if rates.get(key, 0.0) < limits.threshold_per_s * limits.cool_share:
                self._cool_for[key] = self._cool_for.get(key, 0) + 1
                if self._cool_for[key] >= limits.cool_windows:
                    cooled.append(key)
            else:
                self._cool_for.pop(key, None)
        for key in [k for k in self._cool_for if k not in split or k in cooled]:
            del self._cool_for[key]
        top = tuple(heapq.nlargest(5, rates.items(), key=lambda item: item[1]))
        self.busiest_per_s = top[0][1] if top else 0.0
        self._counts = {}
        self._floor = 0
        self._window_started_s = now_s
        return Verdict(tuple(k for k in hot if k not in split), tuple(cooled), top)
