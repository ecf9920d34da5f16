"""The correctness audit, run after every target's phases, the same for every target.

From the client's ledger (what it saw acknowledged, and which calls have an unknown fate,
streamed back from the generator processes' ledger files, see ``benchmarks.ledger``) it
derives, per key, bounds on what the server must hold, then reads the server's state back:

1. ``no_oversell``: for every key touched, the server's available (on_hand - reserved -
   safety_stock) is >= 0, and the units the client saw admitted and still held or committed
   never exceed the key's stock.
2. ``acknowledged_reservations_exist``: every acknowledged reservation (all, or a seeded
   sample of ``sample_max`` drawn as the ledger streams by) exists with the state the client
   last saw: active (or expired once its TTL may have passed), committed, released. A
   reservation whose commit or release had an unknown fate may be in either state.
3. ``counters_add_up``: per key, ``reserved`` lies between the units of live acknowledged
   reservations that cannot have expired yet and that plus everything of unknown fate and
   everything that may have expired; ``on_hand`` lies between stock minus committed units
   (plus unknown commits) and stock minus acknowledged committed units.
4. ``ledger_complete`` (when the caller says how many entries the generator processes wrote):
   the ledger read back has exactly that many entries, so a lost or truncated file cannot
   make the other checks pass on a partial history.

The ledger is read once; the audit holds four counters per key touched and the sample, never
the whole history. Violations list at most ``VIOLATIONS_SHOWN_MAX`` examples each.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .ledger import LedgerEntry
from .targets import Level, ReservationRef, ReservationState, Target
from .workloads import Catalogue, Key

VIOLATIONS_SHOWN_MAX = 5


@dataclass
class Bounds:
    """Per key, in units: what the server's counters must lie between."""

    live_certain: int = 0  # live and cannot have expired yet
    live_possible: int = 0  # may be live: + unknown fates + those that may have expired
    committed_certain: int = 0
    committed_possible: int = 0


@dataclass
class History:
    """The ledger folded into per-key bounds and a seeded sample of acknowledged entries."""

    sample_max: int
    seed: int
    now_s: float
    bounds: dict[Key, Bounds] = field(default_factory=dict)
    sample: list[LedgerEntry] = field(default_factory=list)
    entries: int = 0
    acknowledged: int = 0
    unknown_fate: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def add(self, entry: LedgerEntry) -> None:
        self.entries += 1
        may_have_expired = self.now_s >= entry.expires_after_s
        for key, quantity in entry.lines:
            bounds = self.bounds.get(key)
            if bounds is None:
                bounds = self.bounds[key] = Bounds()
            if entry.fate == "active":
                bounds.live_possible += quantity
                if not may_have_expired:
                    bounds.live_certain += quantity
            elif entry.fate == "committed":
                bounds.committed_certain += quantity
                bounds.committed_possible += quantity
            elif entry.fate in ("unknown-reserve", "unknown-finish"):
                bounds.live_possible += quantity
                bounds.committed_possible += quantity
        if entry.fate.startswith("unknown"):
            self.unknown_fate += 1
        if entry.reservation_id:
            self._keep_sampled(entry)

    def _keep_sampled(self, entry: LedgerEntry) -> None:
        """Reservoir sampling (algorithm R): each acknowledged entry is kept with the same
        chance, whatever the ledger's length."""
        self.acknowledged += 1
        if len(self.sample) < self.sample_max:
            self.sample.append(entry)
            return
        slot = self._random.randrange(self.acknowledged)
        if slot < self.sample_max:
            self.sample[slot] = entry


def _check(violations: list[str], checked: int) -> dict[str, Any]:
    return {
        "passed": not violations,
        "checked": checked,
        "violations": len(violations),
        "examples": violations[:VIOLATIONS_SHOWN_MAX],
    }


async def audit(
    target: Target,
    catalogue: Catalogue,
    *,
    ledger: Iterable[LedgerEntry],
    hot_keys: Sequence[Key],
    sample_max: int,
    seed: int,
    entries_expected: int | None = None,
) -> dict[str, Any]:
    history = History(sample_max=sample_max, seed=seed, now_s=time.time())
    for entry in ledger:
        history.add(entry)
    for key in hot_keys:
        history.bounds.setdefault(key, Bounds())
    keys = sorted(history.bounds, key=lambda k: (k.merchant_id, k.location_id, k.sku_id))
    levels = await target.levels(keys)
    oversold, counters = _check_levels(catalogue, history, keys, levels)
    missing = await _check_reservations(target, history)
    checks = {
        "no_oversell": _check(oversold, len(keys)),
        "acknowledged_reservations_exist": _check(missing, len(history.sample)),
        "counters_add_up": _check(counters, len(keys)),
    }
    if entries_expected is not None:
        lost = (
            []
            if history.entries == entries_expected
            else [f"read {history.entries} ledger entries, the generators wrote {entries_expected}"]
        )
        checks["ledger_complete"] = _check(lost, history.entries)
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "ledger_entries": history.entries,
        "reservations_acknowledged": history.acknowledged,
        "unknown_fate": history.unknown_fate,
        "checks": checks,
    }


def _check_levels(
    catalogue: Catalogue, history: History, keys: Sequence[Key], levels: dict[Key, Level]
) -> tuple[list[str], list[str]]:
    oversold: list[str] = []
    counters: list[str] = []
    for key in keys:
        stock = catalogue.initial_on_hand(key)
        level = levels.get(key)
        if level is None:
            counters.append(f"{key}: missing on the server")
            continue
        bounds = history.bounds[key]
        available = level.on_hand - level.reserved - level.safety_stock
        if available < 0:
            oversold.append(f"{key}: available {available} < 0")
        if bounds.live_certain + bounds.committed_certain > stock:
            oversold.append(
                f"{key}: {bounds.live_certain} held + {bounds.committed_certain} committed"
                f" acknowledged > stock {stock}"
            )
        if not bounds.live_certain <= level.reserved <= bounds.live_possible:
            counters.append(
                f"{key}: reserved {level.reserved} not in [{bounds.live_certain},"
                f" {bounds.live_possible}]"
            )
        low, high = stock - bounds.committed_possible, stock - bounds.committed_certain
        if not low <= level.on_hand <= high:
            counters.append(f"{key}: on_hand {level.on_hand} not in [{low}, {high}]")
    return oversold, counters


async def _check_reservations(target: Target, history: History) -> list[str]:
    refs = [
        ReservationRef(e.reservation_id, e.lines[0][0].merchant_id, e.lines[0][0].location_id)
        for e in history.sample
    ]
    states = await target.reservation_states(refs)
    missing: list[str] = []
    for entry in history.sample:
        state = states.get(entry.reservation_id)
        if not _state_fits(entry, state, history.now_s):
            missing.append(f"{entry.reservation_id}: saw {entry.fate}, server has {state}")
    return missing


def _state_fits(entry: LedgerEntry, state: str | None, now_s: float) -> bool:
    expirable = now_s >= entry.expires_after_s
    if entry.fate == "active":
        return state == ReservationState.ACTIVE or (expirable and state == ReservationState.EXPIRED)
    if entry.fate == "unknown-finish":
        return state is not None
    return state == entry.fate
