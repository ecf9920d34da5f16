"""Feed health: when each location last heard from each of its feeds (DESIGN section 9).

A location's ``LocationFeed`` keeps, per source that ever sent it an event, the newest time
an event of it occurred, when its last record arrived, and that record's lag (arrival less
the newest occurrence in it). A record of a source refreshes it: one that records events,
or a heartbeat (an ``Ingest`` naming the location in ``alive_at``: the gateway is up with
nothing to send). Heartbeats are kept at most once per ``feed_heartbeat_interval_ms`` per
source, so a gateway's heartbeat every few seconds costs no ledger record each.

A location is **stale** when no source has been heard from for the deployment's threshold
(``feed_silence_stale_ms`` by default; carried in each ``MarkStale`` record, so a replay
marks the same): the timer's ``MarkStale`` record then holds back a buffer on each of its keys
(``rules/staleness.py``) until a source is heard from again. Only a location that has had a
feed can go stale: an online-only dark store never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._codec import integer, location_from_data, location_to_data
from ._model import FeedLocation
from ._tables import TableSchema


@dataclass(frozen=True, slots=True)
class SourceHealth:
    source: str
    # The newest occurred_at of an event recorded from it (0: only heartbeats so far).
    last_occurred_at_ms: int
    # When its last record (events or a heartbeat) was applied.
    last_received_at_ms: int
    # Of its last record with events: when it arrived less the newest occurred_at in it.
    lag_ms: int


@dataclass(frozen=True, slots=True)
class LocationFeed:
    # By source.
    sources: tuple[SourceHealth, ...]
    # When the timer marked it stale; 0 while a source has been heard from recently.
    stale_since_ms: int = 0

    @property
    def last_received_at_ms(self) -> int:
        return max(s.last_received_at_ms for s in self.sources)

    @property
    def last_occurred_at_ms(self) -> int:
        return max(s.last_occurred_at_ms for s in self.sources)

    def source(self, name: str) -> SourceHealth | None:
        for found in self.sources:
            if found.source == name:
                return found
        return None

    def with_source(self, health: SourceHealth) -> LocationFeed:
        """This feed with one source's health replaced (or added), and live again."""
        others = [s for s in self.sources if s.source != health.source]
        return LocationFeed(tuple(sorted((*others, health), key=lambda s: s.source)))


@dataclass(frozen=True, slots=True)
class LocationHealth:
    """A location's feeds as a read shows them, at the read's time."""

    location: FeedLocation
    feed: LocationFeed
    now_ms: int

    @property
    def silent_for_ms(self) -> int:
        return max(self.now_ms - self.feed.last_received_at_ms, 0)


def _feed_to_data(feed: LocationFeed) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sources": [
            [s.source, s.last_occurred_at_ms, s.last_received_at_ms, s.lag_ms] for s in feed.sources
        ]
    }
    if feed.stale_since_ms:
        data["stale_since_ms"] = feed.stale_since_ms
    return data


def _feed_from_data(data: Any) -> LocationFeed:
    sources = tuple(
        SourceHealth(str(source), integer(occurred), integer(received), integer(lag))
        for source, occurred, received, lag in data["sources"]
    )
    return LocationFeed(sources, integer(data.get("stale_since_ms", 0)))


FEED_LOCATIONS: TableSchema[FeedLocation, LocationFeed] = TableSchema(
    name="feed_locations",
    key_to_data=location_to_data,
    key_from_data=location_from_data,
    row_to_data=_feed_to_data,
    row_from_data=_feed_from_data,
    # Restored least recently heard from first: the order the silence index keeps.
    restore_order=lambda feed: feed.last_received_at_ms,
)
