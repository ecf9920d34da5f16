"""The correctness audit, run after every target's phases, the same for every target.

From the client's ledger (what it saw acknowledged, and which calls have an unknown fate) it
derives, per key, bounds on what the server must hold, then reads the server's state back:

1. ``no_oversell``: for every key touched, the server's available (on_hand - reserved -
   safety_stock) is >= 0, and the units the client saw admitted and still held or committed
   never exceed the key's stock.
2. ``acknowledged_reservations_exist``: every acknowledged reservation (all, or a seeded
   sample of ``sample_max``) exists with the state the client last saw: active (or expired
   once its TTL may have passed), committed, released. A reservation whose commit or release
   had an unknown fate may be in either state.
3. ``counters_add_up``: per key, ``reserved`` lies between the units of live acknowledged
   reservations that cannot have expired yet and that plus everything of unknown fate and
   everything that may have expired; ``on_hand`` lies between stock minus committed units
   (plus unknown commits) and stock minus acknowledged committed units.

Violations list at most ``VIOLATIONS_SHOWN_MAX`` examples each.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .runner import LedgerEntry
from .targets import ReservationRef, ReservationState, Target
from .workloads import Catalogue, Key

VIOLATIONS_SHOWN_MAX = 5


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
    ledger: Sequence[LedgerEntry],
    hot_keys: Sequence[Key],
    sample_max: int,
    seed: int,
) -> dict[str, Any]:
    now_s = time.time()
    live_certain: dict[Key, int] = defaultdict(int)  # live, cannot have expired
    live_possible: dict[Key, int] = defaultdict(int)  # may be live: + unknown + expirable
    committed_certain: dict[Key, int] = defaultdict(int)
    committed_possible: dict[Key, int] = defaultdict(int)
    touched: set[Key] = set(hot_keys)
    for entry in ledger:
        may_have_expired = now_s >= entry.expires_after_s
        for key, quantity in entry.lines:
            touched.add(key)
            if entry.fate == "active":
                live_possible[key] += quantity
                if not may_have_expired:
                    live_certain[key] += quantity
            elif entry.fate == "committed":
                committed_certain[key] += quantity
                committed_possible[key] += quantity
            elif entry.fate in ("unknown-reserve", "unknown-finish"):
                live_possible[key] += quantity
                committed_possible[key] += quantity
    keys = sorted(touched, key=lambda k: (k.merchant_id, k.location_id, k.sku_id))
    levels = await target.levels(keys)

    oversold: list[str] = []
    counters: list[str] = []
    for key in keys:
        stock = catalogue.initial_on_hand(key)
        level = levels.get(key)
        if level is None:
            counters.append(f"{key}: missing on the server")
            continue
        available = level.on_hand - level.reserved - level.safety_stock
        if available < 0:
            oversold.append(f"{key}: available {available} < 0")
        if live_certain[key] + committed_certain[key] > stock:
            oversold.append(
                f"{key}: {live_certain[key]} held + {committed_certain[key]} committed"
                f" acknowledged > stock {stock}"
            )
        if not live_certain[key] <= level.reserved <= live_possible[key]:
            counters.append(
                f"{key}: reserved {level.reserved} not in [{live_certain[key]},"
                f" {live_possible[key]}]"
            )
        low, high = stock - committed_possible[key], stock - committed_certain[key]
        if not low <= level.on_hand <= high:
            counters.append(f"{key}: on_hand {level.on_hand} not in [{low}, {high}]")

    acknowledged = [e for e in ledger if e.reservation_id]
    if len(acknowledged) > sample_max:
        acknowledged = random.Random(seed).sample(acknowledged, sample_max)
    refs = [
        ReservationRef(e.reservation_id, e.lines[0][0].merchant_id, e.lines[0][0].location_id)
        for e in acknowledged
    ]
    states = await target.reservation_states(refs)
    missing: list[str] = []
    for entry in acknowledged:
        state = states.get(entry.reservation_id)
        if not _state_fits(entry, state, now_s):
            missing.append(f"{entry.reservation_id}: saw {entry.fate}, server has {state}")

    checks = {
        "no_oversell": _check(oversold, len(keys)),
        "acknowledged_reservations_exist": _check(missing, len(acknowledged)),
        "counters_add_up": _check(counters, len(keys)),
    }
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "reservations_acknowledged": sum(1 for e in ledger if e.reservation_id),
        "unknown_fate": sum(1 for e in ledger if e.fate.startswith("unknown")),
        "checks": checks,
    }


def _state_fits(entry: LedgerEntry, state: str | None, now_s: float) -> bool:
    expirable = now_s >= entry.expires_after_s
    if entry.fate == "active":
        return state == ReservationState.ACTIVE or (expirable and state == ReservationState.EXPIRED)
    if entry.fate == "unknown-finish":
        return state is not None
    return state == entry.fate
