"""Watch's view of hot keys: a split key streams as one key, its parts added up.

A split key's home and buckets each publish their own changes, in their own partitions. A
shopper watching the key must see one key: the total of its parts (``hot_keys.add_up``) with
one version that only goes up (``hot_keys.shown_version``). ``SplitTotals`` keeps, for every
split key the router knows (``HotKeyMap``, refreshed every second), each part's latest
counts, learnt from the parts' changes as the hub reads them and from the levels each refresh
brings (whichever is newer by version), and turns the changes it is offered into what
subscribers see:

- a bucket's change is never shown as such (callers cannot name a bucket): it moves its
  home key's total, if the router knows the split, else nothing;
- a split home's change moves its total;
- any other change passes as it is.

A hot key's parts change thousands of times a second, and a subscriber keeps only the
latest change of a key anyway, so the totals are added up once per hub read (``take`` each
change, then ``flush``), not once per change.

A total is shown only when its version is above the last this router showed for the key,
so a part learnt late never moves a total back. Its staleness: each part's counts are the
latest the hub has read, so the total lags a part's change by the hub's read lag (the change
streams' lag, ``WatchMetrics.lag_ms_*``), or, for a split this router has just learnt of,
by up to one refresh. Resuming a stream sends every matching split key's total afresh: the
stream positions in a resume token do not cover the buckets' partitions.

Pure and synchronous: the hub calls it between reads, and nothing here awaits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from inventory.v1 import events_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import BUCKET_SEPARATOR, InventoryKey, home_key, partition_of

from ..common.convert import key_from_proto, key_to_proto
from .hot_keys import SplitView, add_up, shown_version

Change = events_pb2.AvailabilityChanged


@dataclass(slots=True)
class _Part:
    version: int
    counts: events_pb2.StockCounts


@dataclass(frozen=True, slots=True)
class _Total:
    counts: events_pb2.StockCounts
    version: int
    parts: int  # the parts it adds up (0: the home alone is the whole key)


@dataclass(slots=True)
class _Split:
    parts: tuple[InventoryKey, ...]  # the home first, then its buckets
    partition: int  # the home's
    known: dict[InventoryKey, _Part]
    shown: _Total | None = None  # the last total shown: the ``before`` of the next
    cause: Change | None = None  # the latest change taken and not yet added up (``flush``)


class SplitTotals:
    """The split keys' parts as the watch hub last heard of them (bounded by the map's
    ``HOT_KEYS_MAX`` keys of at most 16 parts)."""

    def __init__(self, partition_count: int) -> None:
        self._partition_count = partition_count
        self._splits: dict[InventoryKey, _Split] = {}
        self._partitions: frozenset[int] = frozenset()
        self._moved: dict[InventoryKey, _Split] = {}  # taken, not yet flushed

    def partitions(self) -> frozenset[int]:
        """The buckets' partitions: the hub reads them while anyone watches."""
        return self._partitions

    def follow(self, views: Iterable[SplitView]) -> list[tuple[int, Change]]:
        """The split keys are now these (a refresh): learn their parts' levels. Returns the
        totals that changed, each with its home's partition, to offer to subscribers."""
        splits: dict[InventoryKey, _Split] = {}
        changed: list[tuple[int, Change]] = []
        for view in views:
            split = self._splits.get(view.home)
            if split is None or split.parts != view.parts:
                home = view.home
                partition = partition_of(home.merchant_id, home.location_id, self._partition_count)
                split = _Split(view.parts, partition, {})
                if view.home in self._splits:  # new buckets: the versions still only go up
                    split.shown = self._splits[view.home].shown
            splits[view.home] = split
            learnt = [_learn(split, part, level) for part, level in view.levels.items()]
            if any(learnt):
                total = self._total(split, None)
                if total is not None:
                    changed.append((split.partition, total))
        self._splits = splits
        self._partitions = frozenset(
            partition_of(part.merchant_id, part.location_id, self._partition_count)
            for split in splits.values()
            for part in split.parts[1:]
        )
        return changed

    def take(self, event: Change) -> Change | None:
        """A change read from a stream: itself if subscribers see it as it is, else None. A
        split key's part's change is learnt, and its total is added up by ``flush``, once
        per read however many of its parts' changes the read brought."""
        location_id = event.key.location_id
        if BUCKET_SEPARATOR not in location_id and not self._splits:
            return event
        part = key_from_proto(event.key)
        home = home_key(part)
        split = self._splits.get(home)
        if split is None or part not in split.parts:
            return None if home != part else event
        if _know(split, part, event.version, event.after):
            split.cause = event
            self._moved[home] = split
        return None

    def flush(self) -> list[tuple[int, Change]]:
        """The totals the changes taken since the last flush moved, each with its home's
        partition, as changes caused by the latest of them."""
        moved, self._moved = self._moved, {}
        found = []
        for split in moved.values():
            cause, split.cause = split.cause, None
            total = self._total(split, cause)
            if total is not None:
                found.append((split.partition, total))
        return found

    def replayed(self, event: Change) -> Change | None:
        """A change replayed from a stream on resume: a split key's is not (its total is sent
        afresh after the replay, ``totals``), a bucket's never; any other is."""
        part = key_from_proto(event.key)
        if BUCKET_SEPARATOR in part.location_id or part in self._splits:
            return None
        return event

    def level(self, level: pb.StockLevel) -> pb.StockLevel | None:
        """What a snapshot shows of a level read from the read view (None: nothing)."""
        part = key_from_proto(level.key)
        if BUCKET_SEPARATOR in part.location_id:
            return None
        split = self._splits.get(part)
        if split is None:
            return level
        _learn(split, part, level)
        return self._level(split) or level

    def totals(self, matches: Callable[[pb.InventoryKey], bool]) -> list[Change]:
        """The current total of every split key ``matches`` picks, as changes."""
        found = []
        for home, split in self._splits.items():
            if split.shown is not None and matches(key_to_proto(home)):
                found.append(_as_change(split, split.shown, None, None))
        return found

    # ------------------------------------------------------------------------ plumbing

    def _total(self, split: _Split, cause: Change | None) -> Change | None:
        """The split key's total as a change, if it is newer than the last shown."""
        total = _add_up(split)
        before = split.shown
        if total is None or (before is not None and total.version <= before.version):
            return None
        split.shown = total
        return _as_change(split, total, cause, before)

    def _level(self, split: _Split) -> pb.StockLevel | None:
        total = _add_up(split)
        if total is not None and (split.shown is None or total.version > split.shown.version):
            split.shown = total
        shown = split.shown
        if shown is None:
            return None
        counts = shown.counts
        return pb.StockLevel(
            key=key_to_proto(split.parts[0]),
            on_hand=counts.on_hand,
            reserved=counts.reserved,
            safety_stock=counts.safety_stock,
            available=counts.available,
            sellable=counts.sellable,
            version=shown.version,
            exists=True,
            exposure=max(-counts.available, 0),
            degraded=counts.stale_since_ms != 0,
            stale_buffer=counts.stale_buffer,
            stale_since_ms=counts.stale_since_ms,
            incoming=counts.incoming,
            incoming_eta_ms=counts.incoming_eta_ms,
            allotted=counts.allotted,
            parts=shown.parts,
        )


def _add_up(split: _Split) -> _Total | None:
    """The key's total from what is known of its parts (None: its home is not known yet)."""
    home = split.known.get(split.parts[0])
    if home is None:
        return None
    buckets = [split.known[p] for p in split.parts[1:] if p in split.known]
    counts = events_pb2.StockCounts()
    counts.CopyFrom(home.counts)
    added = add_up(counts, [b.counts for b in buckets])
    version = shown_version(home.version, home.counts.allotted, [b.version for b in buckets])
    return _Total(counts, version, len(split.parts) if added else 0)


def _as_change(split: _Split, total: _Total, cause: Change | None, before: _Total | None) -> Change:
    change = Change(
        key=key_to_proto(split.parts[0]),
        version=total.version,
        after=total.counts,
        reason="quota" if cause is None else cause.reason,
        partition=split.partition if cause is None else cause.partition,
        parts=total.parts,
    )
    if before is not None:
        change.before.CopyFrom(before.counts)
    if cause is not None:
        change.lsn = cause.lsn
        change.recorded_at_ms = cause.recorded_at_ms
        change.committed_at_ms = cause.committed_at_ms
    return change


def _learn(split: _Split, part: InventoryKey, level: pb.StockLevel) -> bool:
    """A part's level (a refresh or a snapshot), if newer than what is known of it."""
    if part not in split.parts:
        return False
    counts = events_pb2.StockCounts(
        on_hand=level.on_hand,
        reserved=level.reserved,
        safety_stock=level.safety_stock,
        available=level.available,
        stale_buffer=level.stale_buffer,
        stale_since_ms=level.stale_since_ms,
        sellable=level.sellable,
        incoming=level.incoming,
        incoming_eta_ms=level.incoming_eta_ms,
        allotted=level.allotted,
    )
    return _know(split, part, level.version, counts)


def _know(split: _Split, part: InventoryKey, version: int, counts: events_pb2.StockCounts) -> bool:
    """Keep a part's counts unless what is known of it is as new: True if kept."""
    known = split.known.get(part)
    if known is not None and known.version >= version:
        return False
    split.known[part] = _Part(version, counts)
    return True
