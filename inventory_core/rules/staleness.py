"""Stale locations: a store whose feeds fell silent, and its return (DESIGN section 9).

While a store's tills sell offline, the service cannot see those sales; online shoppers
would be promised units already gone. So when no feed of a location has been heard from for
``MarkStale.silent_ms`` (the deployment's setting, ``feed_silence_stale_ms`` by default;
``_health.py``), the timer's ``MarkStale`` record flags every key
there as stale, since that moment, and holds back a **buffer** on each: the units its tills
sold in the ``feed_sales_rate_window_ms`` before the feed's newest event (from the key's
history), the expected sales of an hour offline. Reads and Watch show ``sellable`` less the
buffer, flagged degraded with the time; a reservation must fit in available less the buffer.
The buffer is fixed when the location goes stale, so shoppers see one change, not a drift.

The first record heard from the location again (events or a heartbeat) clears every flag in
the same record that applies its events: the backlog is reconciled as any events are, and
an over-commitment it leaves is reported (``rules/feeds.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import _limits as limits
from .._commands import MarkStale
from .._health import LocationFeed, SourceHealth
from .._model import ChangeReason, FeedLocation, InventoryKey
from .._outcomes import MarkedStale
from .._state import Effects, PartitionState

# Locations one MarkStale record marks at most; more due ones wait for the next tick.
MARK_STALE_LOCATIONS_MAX = 100


def stale_due(state: PartitionState, now_ms: int, silent_ms: int) -> tuple[FeedLocation, ...]:
    """The live locations silent for ``silent_ms`` at ``now_ms``, in location order."""
    due = []
    for location in state.silence:  # least recently heard from first
        feed = state.feed_locations[location]
        if now_ms - feed.last_received_at_ms < silent_ms:
            break
        due.append(location)
        if len(due) == MARK_STALE_LOCATIONS_MAX:
            break
    return tuple(sorted(due))


def next_stale_ms(state: PartitionState, silent_ms: int) -> int | None:
    """When the least recently heard from live location goes stale (None: none is fed)."""
    for location in state.silence:
        return state.feed_locations[location].last_received_at_ms + silent_ms
    return None


def mark_stale(state: PartitionState, command: MarkStale, at: Effects) -> MarkedStale:
    marked = []
    for location in command.locations:
        feed = state.feed_locations.get(location)
        silent = feed is not None and (at.now_ms - feed.last_received_at_ms >= command.silent_ms)
        if feed is None or feed.stale_since_ms or not silent:
            continue  # heard from since it was found due (or never fed): nothing to do
        marked.append(location)
        _hold_back(state, location, feed, at)
    return MarkedStale(tuple(marked))


def _hold_back(
    state: PartitionState, location: FeedLocation, feed: LocationFeed, at: Effects
) -> None:
    state.feed_locations.put(location, LocationFeed(feed.sources, stale_since_ms=at.now_ms))
    del state.silence[location]
    state.stale_keys[location] = {}
    since_ms = feed.last_occurred_at_ms - limits.feed_sales_rate_window_ms
    # In key order: a replay, whatever order its restored table holds, emits the same.
    for key in sorted(_keys_at(state, location)):
        buffer = _sold_at_till(state, key, since_ms)
        state.change(
            key, at, ChangeReason.FEED_STALE, stale_buffer=buffer, stale_since_ms=at.now_ms
        )


def _keys_at(state: PartitionState, location: FeedLocation) -> Iterable[InventoryKey]:
    merchant_id, location_id = location
    return [k for k in state.stock if k.location_id == location_id and k.merchant_id == merchant_id]


def _sold_at_till(state: PartitionState, key: InventoryKey, since_ms: int) -> int:
    """Units the key's feeds sold (net of nothing: returns are not promised back) that
    occurred after ``since_ms``, as far as its history still holds them."""
    history = state.feed.get(key)
    if history is None:
        return 0
    return sum(
        -fact.quantity
        for fact in history.deltas
        if fact.kind == "sale" and not fact.is_own and fact.occurred_at_ms > since_ms
    )


# ------------------------------------------------------------------- heard from again


def resuming(state: PartitionState, locations: Iterable[FeedLocation]) -> set[FeedLocation]:
    """Which of these locations, heard from by the record being applied, are stale now."""
    return {loc for loc in locations if loc in state.stale_keys}


def resume(
    state: PartitionState, at: Effects, locations: Iterable[FeedLocation], done: set[InventoryKey]
) -> None:
    """Clear the flags at these stale locations, but for the keys the record already changed
    (``done``, cleared with their own change): one change per key per record."""
    for location in sorted(locations):
        for key in sorted(state.stale_keys[location].keys() - done):
            state.change(key, at, ChangeReason.FEED_RESUMED, stale_buffer=0, stale_since_ms=0)
        assert not state.stale_keys[location], location
        del state.stale_keys[location]


def heard(
    state: PartitionState,
    at: Effects,
    source: str,
    newest: dict[FeedLocation, int],
) -> None:
    """The record's source was heard from at these locations: each one's newest occurred_at
    in the record (0 for a heartbeat). Each becomes live and most recently heard from."""
    for location, occurred_at_ms in newest.items():
        feed = state.feed_locations.get(location) or LocationFeed(())
        found = feed.source(source)
        last_occurred = max(occurred_at_ms, found.last_occurred_at_ms if found else 0)
        lag_ms = at.now_ms - occurred_at_ms if occurred_at_ms else (found.lag_ms if found else 0)
        health = SourceHealth(source, last_occurred, at.now_ms, max(lag_ms, 0))
        state.feed_locations.put(location, feed.with_source(health))
        state.silence.pop(location, None)
        state.silence[location] = None  # now the most recently heard from


def heartbeat_kept(state: PartitionState, location: FeedLocation, source: str, now_ms: int) -> bool:
    """Whether a heartbeat changes what the location's health says: it is stale, or the
    source's last record is ``feed_heartbeat_interval_ms`` old, or the source is new to it
    and there is room. A heartbeat of a location never fed keeps nothing."""
    feed = state.feed_locations.get(location)
    if feed is None:
        return False
    if feed.stale_since_ms:
        return True
    found = feed.source(source)
    if found is None:
        return len(feed.sources) < limits.feed_sources_per_location_max
    return now_ms - found.last_received_at_ms >= limits.feed_heartbeat_interval_ms


def source_problem(state: PartitionState, location: FeedLocation, source: str) -> str | None:
    """Why an event of this source cannot be kept at this location (no room for one more
    source), or None."""
    feed = state.feed_locations.get(location)
    if feed is None or feed.source(source) is not None:
        return None
    if len(feed.sources) < limits.feed_sources_per_location_max:
        return None
    return f"the location already has {limits.feed_sources_per_location_max} sources"
