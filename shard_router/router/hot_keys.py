"""The router's side of hot keys (DESIGN section 10): placing, spreading, adding up.

- **Placing.** A bucket's partition is that of its location ("<location>~<n>"), so choosing
  its number chooses its owner. ``bucket_numbers`` takes numbers in order, keeping each that
  lands on an owner none of the key's parts has yet; when the shards run out before the
  buckets do, the rest only get partitions of their own. The placement holds for the ring it
  was made on: after the ring changes, buckets may share an owner until the key is merged and
  split again.
- **Knowing.** ``HotKeyMap`` holds every split key the shards hold (``GetHotKeys``, every
  ``REFRESH_INTERVAL_S``) with each part's latest level, also updated from the answers the
  parts give; a split or merge made through this router is known at once.
- **Spreading.** A one-line Reserve of a split key (merging too) walks its parts in the
  order its idempotency key fixes (``walk_order``): each part admits it from what it offers,
  or refuses; a refusal is kept when the walk goes on past it, so that a retry meets the same
  answers. A cart of several keys goes to the home, which serves it from its own share.
- **Adding up.** Reads and the answers about a bucket's reservations show the key as
  callers know it: the home's shelf, every part's reservations, and what the parts offer
  together (``SplitView.total``); a reservation a bucket holds names the key
  (``for_caller``). Units in transit are offered nowhere, so the total undercounts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from inventory.v1 import inventory_pb2 as pb

from inventory_core import (
    BUCKET_SEPARATOR,
    InventoryKey,
    bucket_key,
    home_key,
    limits,
    partition_of,
)

from ..common.convert import key_from_proto, key_to_proto

log = structlog.get_logger(__name__)

# Split keys one router spreads: a viral SKU is rare, a thousand at once is a marketplace
# on fire; 10,000 bounds the map (~1 KiB a key with its parts' levels) at ~10 MiB.
HOT_KEYS_MAX = 10_000
# How often the router asks the shards for their split keys and the parts' levels: a split
# made through another router is spread within about a second, and what a part offers is
# known to within one period (answers update it in between).
REFRESH_INTERVAL_S = 1.0
# One refresh's deadline: a shard that does not answer in this long is left for the next.
REFRESH_DEADLINE_S = 5.0


def bucket_numbers(
    key: InventoryKey, count: int, owner_of: Callable[[int], str | None]
) -> tuple[int, ...]:
    """``count`` bucket numbers for ``key``: on owners of their own while there are any,
    each in a partition of its own and apart from the home's."""
    home = partition_of(key.merchant_id, key.location_id)
    partitions, owners = {home}, {owner_of(home)}
    chosen: list[int] = []
    spare: list[int] = []  # partitions of their own, on an owner already taken
    for number in range(1, limits.bucket_number_max + 1):
        if len(chosen) == count:
            break
        bucket = bucket_key(key, number)
        partition = partition_of(bucket.merchant_id, bucket.location_id)
        if partition in partitions:
            continue
        partitions.add(partition)
        owner = owner_of(partition)
        if owner is not None and owner not in owners:
            owners.add(owner)
            chosen.append(number)
        else:
            spare.append(number)
    return tuple(sorted(chosen + spare[: count - len(chosen)]))


# ------------------------------------------------------------------- what the router knows


@dataclass(slots=True)
class SplitView:
    """One split key as the router last heard of it: its parts (the home first, then its
    buckets) and each part's latest level."""

    home: InventoryKey
    parts: tuple[InventoryKey, ...]
    generation: int
    merging: bool
    levels: dict[InventoryKey, pb.StockLevel] = field(default_factory=dict)
    # What a part said it had when it refused a reservation (until its next level).
    refused_at: dict[InventoryKey, int] = field(default_factory=dict)
    partitions: dict[InventoryKey, int] = field(init=False)  # each part's

    def __post_init__(self) -> None:
        self.partitions = {p: partition_of(p.merchant_id, p.location_id) for p in self.parts}

    def offered(self, part: InventoryKey) -> int:
        """What the part could promise when last heard from (0 if never heard from)."""
        if part in self.refused_at:
            return self.refused_at[part]
        level = self.levels.get(part)
        return 0 if level is None else offered_of(level)

    def note(self, part: InventoryKey, level: pb.StockLevel) -> None:
        """A part's level (a copy: answers are changed in place after), unless it is older
        than the level known (from a read view behind)."""
        known = self.levels.get(part)
        if known is None or known.version <= level.version:
            kept = pb.StockLevel()
            kept.CopyFrom(level)
            self.levels[part] = kept
        self.refused_at.pop(part, None)

    def total(self) -> pb.StockLevel:
        """The key as callers see it (``add_up``), with what the parts offer as last heard."""
        home = self.levels.get(self.home) or pb.StockLevel(key=key_to_proto(self.home))
        buckets = [self.levels[part] for part in self.parts[1:] if part in self.levels]
        level = pb.StockLevel()
        level.CopyFrom(home)
        if add_up(level, buckets, sum(self.offered(part) for part in self.parts)):
            level.exposure = max(-level.available, 0)
            level.version = shown_version(
                home.version, home.allotted, [bucket.version for bucket in buckets]
            )
            level.parts = len(self.parts)
        return level


class Counts(Protocol):
    """A part's counts: ``pb.StockLevel`` and ``events_pb2.StockCounts`` both have them."""

    on_hand: int
    reserved: int
    safety_stock: int
    available: int
    stale_buffer: int
    sellable: int
    allotted: int


def add_up(total: Counts, buckets: Iterable[Counts], offered: int | None = None) -> bool:
    """In place: ``total``, a copy of a split key's home counts, becomes the key as callers
    see it, and True; False (left as it is) while the home allots nothing, for then its
    buckets hold nothing and the home is the whole key.

    - on_hand: the home's shelf, less what it allotted, plus what the buckets hold (a unit a
      bucket's reservation committed has left the shelf before its return reports it home);
    - reserved: every part's reservations; available follows, with the home's safety stock;
    - sellable: what the parts offer together (``offered`` when the caller knows fresher
      offers than the counts, as after refusals), never below zero; allotted: 0.

    Units in transit are held nowhere and offered nowhere, so the total undercounts them.
    """
    if not total.allotted:
        return False
    held = 0
    reserved = total.reserved
    offers = offered_of(total)
    for bucket in buckets:
        held += bucket.on_hand
        reserved += bucket.reserved
        offers += offered_of(bucket)
    total.on_hand = total.on_hand - total.allotted + held
    total.reserved = reserved
    total.available = total.on_hand - reserved - total.safety_stock
    total.sellable = max(offers if offered is None else offered, 0)
    total.allotted = 0
    return True


def shown_version(home_version: int, allotted: int, bucket_versions: Iterable[int]) -> int:
    """A split key's version as callers see it: while the home allots units, the sum of its
    parts' versions (each only goes up); else the home's own, which absorbed its buckets'
    when the last unit came home (``inventory_core._buckets``). It never goes down."""
    if not allotted:
        return home_version
    return home_version + sum(bucket_versions)


class HotKeyMap:
    """The split keys the router spreads, by home key, refreshed from the shards
    (``GetHotKeys``) and from the answers of the parts. At most ``keys_max``: past that the
    rest are routed whole to their homes, which serve them from their own share."""

    def __init__(self, keys_max: int = HOT_KEYS_MAX) -> None:
        self._keys_max = keys_max
        self._views: dict[InventoryKey, SplitView] = {}

    def __len__(self) -> int:
        return len(self._views)

    def get(self, key: InventoryKey) -> SplitView | None:
        return self._views.get(key)

    def keys(self) -> set[InventoryKey]:
        return set(self._views)

    def views(self) -> list[SplitView]:
        return list(self._views.values())

    def spread(self, key: InventoryKey) -> SplitView | None:
        """The view to spread a reservation of ``key`` over, or None: route it whole. A
        merging key is still walked, so that a retry finds a reservation a bucket holds; its
        buckets get no more units, so new reservations soon land at the home."""
        return self._views.get(key)

    def replace(self, views: list[SplitView]) -> None:
        """What a refresh found: every split key the shards hold, each part's level."""
        kept = views[: self._keys_max]
        if len(views) > self._keys_max:
            log.warning("hot_keys_beyond_bound", found=len(views), kept=self._keys_max)
        self._views = {view.home: view for view in kept}

    def note(self, part: InventoryKey, level: pb.StockLevel) -> None:
        """A part's level from an answer, fresher than the last refresh."""
        view = self._views.get(home_key(part))
        if view is not None and part in view.parts:
            view.note(part, level)

    def put(self, view: SplitView) -> None:
        """A split (or a merge) this router just made: known before the next refresh."""
        if view.home in self._views or len(self._views) < self._keys_max:
            self._views[view.home] = view

    def drop(self, key: InventoryKey) -> None:
        self._views.pop(key, None)


def offered_of(level: Counts) -> int:
    """What a part may promise online (``StockRow.offered``): below zero at a home whose
    till sold units its buckets hold."""
    return level.available - level.stale_buffer - level.allotted


def walk_order(idempotency_key: str, parts: tuple[InventoryKey, ...]) -> list[InventoryKey]:
    """The order a reservation tries a split key's parts in: fixed by its idempotency key
    (rendezvous hashing), so a retry walks the same parts in the same order and meets every
    answer the first walk got (each refusal it moved on from was kept: ``keep_refusal``).
    Uniform over the parts, whatever their quotas: a choice by quota could send a retry to a
    part the first walk never asked, and reserve twice."""

    def score(part: InventoryKey) -> bytes:
        text = f"{idempotency_key}\x1f{part.location_id}".encode()
        return hashlib.blake2b(text, digest_size=8).digest()

    return sorted(parts, key=score, reverse=True)


def view_of(split: pb.HotKeySplit) -> SplitView:
    """A split as its home answered it (its buckets' levels come from their owners)."""
    home = key_from_proto(split.home.key)
    parts = (home, *(key_from_proto(bucket) for bucket in split.buckets))
    view = SplitView(home, parts, split.generation, split.merging)
    view.note(home, split.home)
    return view


def for_caller(reservation: pb.Reservation) -> bool:
    """In place, a reservation a bucket holds as callers see it: at the key's own location,
    its lines naming the key (a commit may name it so too). False if it held no bucket."""
    if BUCKET_SEPARATOR not in reservation.location_id:
        return False
    reservation.location_id = reservation.location_id.partition(BUCKET_SEPARATOR)[0]
    for line in (*reservation.lines, *reservation.committed_lines):
        line.key.location_id = line.key.location_id.partition(BUCKET_SEPARATOR)[0]
    return True
