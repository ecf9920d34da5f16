"""The nouns of the domain: keys, stock rows, reservations, stock levels.

All values are immutable; the partition replaces a row or a reservation when it changes, so
a snapshot is a cheap shallow copy of its maps.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

# Partition count P: a power of two so the router can split ranges evenly; 1024 keeps
# a partition small (about 1000 keys at a million keys) and hand-off cheap.
PARTITION_COUNT = 1024


class InventoryKey(NamedTuple):
    """One stock row's identity. A named tuple, not a dataclass: a key is hashed and compared
    several times per change (every table and index is keyed by it), and a tuple's hash and
    equality run in C, where a dataclass's are Python functions (~0.3 µs a call)."""

    merchant_id: str
    sku_id: str
    location_id: str


class FeedLocation(NamedTuple):
    """A merchant's location, as its feeds' health is kept (DESIGN section 9)."""

    merchant_id: str
    location_id: str


def partition_of(merchant_id: str, location_id: str, partition_count: int = PARTITION_COUNT) -> int:
    """The partition of every key at one merchant's location (stable across processes).

    All lines of a cart sit at one location, so a cart is one partition and one serial step.
    """
    digest = hashlib.blake2b(f"{merchant_id}\x1f{location_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partition_count


# A hot key's bucket is a key of its own (DESIGN section 10): the home key's location with
# this separator and the bucket's number ("store-7~3"). Callers' identifiers never hold it
# (``_validate.IDENTIFIER_CHARACTERS``), so no caller can name a bucket, and a bucket's
# events and read-view row never collide with a real key's.
BUCKET_SEPARATOR = "~"


def bucket_key(key: InventoryKey, number: int) -> InventoryKey:
    """Bucket ``number`` (1 and up) of a hot key: its partition is that of its location."""
    return InventoryKey(key.merchant_id, key.sku_id, f"{key.location_id}{BUCKET_SEPARATOR}{number}")


def home_key(key: InventoryKey) -> InventoryKey:
    """The key a bucket belongs to (a key that is not a bucket is its own home)."""
    location_id, separator, _ = key.location_id.partition(BUCKET_SEPARATOR)
    return InventoryKey(key.merchant_id, key.sku_id, location_id) if separator else key


def bucket_number(key: InventoryKey) -> int:
    """A bucket's number (0 for a key that is not a bucket)."""
    _, separator, number = key.location_id.partition(BUCKET_SEPARATOR)
    return int(number) if separator and number.isascii() and number.isdecimal() else 0


def locations_by_partition(merchant_id: str, location_ids: Iterable[str]) -> dict[int, list[str]]:
    """A merchant's locations grouped by their partition (each location once, first-seen
    order): one request per partition owner."""
    grouped: dict[int, list[str]] = {}
    for location_id in dict.fromkeys(location_ids):
        grouped.setdefault(partition_of(merchant_id, location_id), []).append(location_id)
    return grouped


@dataclass(frozen=True, slots=True)
class StockRow:
    on_hand: int = 0
    reserved: int = 0
    safety_stock: int = 0
    version: int = 0
    # While the key's location is stale (its feeds silent, DESIGN section 9): units held back
    # from shoppers for what the tills may have sold meanwhile, and since when (0: live).
    stale_buffer: int = 0
    stale_since_ms: int = 0
    # Expected deliveries (suppliers' notices) not yet received: their units, and the
    # earliest ETA among them (0: none). Never part of available.
    incoming: int = 0
    incoming_eta_ms: int = 0
    # A hot key's home (DESIGN section 10): the units handed to its buckets as their quota
    # and not yet back (in transit either way, held or reserved there, or committed there and
    # not yet reported). Not offered here, and still part of on_hand: the buckets sell them.
    allotted: int = 0

    @property
    def available(self) -> int:
        """The physical basis of over-commitment: below zero, units promised online (here
        or, for a hot key, by its buckets) are not there."""
        return self.on_hand - self.reserved - self.safety_stock

    @property
    def offered(self) -> int:
        """What this row may promise online now: available less the stale buffer and less
        the units its buckets hold."""
        return self.on_hand - self.reserved - self.safety_stock - self.stale_buffer - self.allotted


EMPTY_ROW = StockRow()


@dataclass(frozen=True, slots=True)
class StockLevel:
    """A key's counts as an answer shows them."""

    key: InventoryKey
    on_hand: int
    reserved: int
    safety_stock: int
    version: int
    exists: bool
    stale_buffer: int = 0
    stale_since_ms: int = 0
    incoming: int = 0
    incoming_eta_ms: int = 0
    allotted: int = 0

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved - self.safety_stock

    @property
    def degraded(self) -> bool:
        """The location's feeds are silent: what shoppers see holds back ``stale_buffer``."""
        return self.stale_since_ms != 0

    @property
    def offered(self) -> int:
        """What this row may promise online: available less the stale buffer and the units
        its buckets hold (below zero when a physical fact took more than it had)."""
        return self.available - self.stale_buffer - self.allotted

    @property
    def sellable(self) -> int:
        """What shoppers see of this row: what it offers, never below zero. A hot key's
        total is its home's offer plus its buckets' (the router adds them up)."""
        return max(self.offered, 0)

    @staticmethod
    def of(key: InventoryKey, row: StockRow | None) -> StockLevel:
        r = row or EMPTY_ROW
        return StockLevel(
            key,
            r.on_hand,
            r.reserved,
            r.safety_stock,
            r.version,
            row is not None,
            r.stale_buffer,
            r.stale_since_ms,
            r.incoming,
            r.incoming_eta_ms,
            r.allotted,
        )


class ReservationState(enum.Enum):
    ACTIVE = "active"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


class AdjustmentReason(enum.Enum):
    RECEIPT = "receipt"
    SALE = "sale"
    RETURN = "return"
    SHRINKAGE = "shrinkage"
    CORRECTION = "correction"
    TRANSFER = "transfer"


class ChangeReason(enum.Enum):
    """Why a key's counts changed, carried by every AvailabilityChanged event."""

    RESERVATION = "reservation"
    COMMIT = "commit"
    RELEASE = "release"
    EXPIRY = "expiry"
    RECEIPT = "receipt"
    SALE = "sale"
    RETURN = "return"
    SHRINKAGE = "shrinkage"
    CORRECTION = "correction"
    TRANSFER = "transfer"
    SET_STOCK = "set_stock"
    SET_SAFETY_STOCK = "set_safety_stock"
    # A hot key's units moved between its home and its buckets, or its split changed
    # (DESIGN section 10): what each part may promise changed, the shelf did not.
    QUOTA = "quota"
    # Feeds (DESIGN section 9): an adjustment and a count from a POS or supplier feed, and
    # several feed events of one record on one key (one change per key per record).
    ADJUSTMENT = "adjustment"
    COUNT = "count"
    FEED = "feed"
    # The location's feeds fell silent (a stale buffer is held back), and came back.
    FEED_STALE = "feed_stale"
    FEED_RESUMED = "feed_resumed"
    # An expected delivery was announced, changed or cancelled (its receipt is "receipt").
    INCOMING = "incoming"


class FeedEventKind(enum.Enum):
    """What a feed event says happened at the store (DESIGN section 9)."""

    SALE = "sale"  # sold at the till: quantity units left the shelf
    RETURN = "return"  # a customer brought quantity units back
    RECEIPT = "receipt"  # a supplier delivered quantity units
    ADJUSTMENT = "adjustment"  # a signed correction: shrinkage, damage, a transfer
    COUNT = "count"  # on_hand was ``count`` at occurred_at

    @property
    def is_count(self) -> bool:
        return self is FeedEventKind.COUNT

    @property
    def sign(self) -> int:
        """How the event's quantity moves on_hand (an adjustment's is already signed)."""
        return -1 if self is FeedEventKind.SALE else 1


@dataclass(frozen=True, slots=True)
class Line:
    """A quantity of one key: a request line, or what a reservation holds."""

    key: InventoryKey
    quantity: int


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    merchant_id: str
    location_id: str
    # What it holds: one line per key, in first-seen request order.
    lines: tuple[Line, ...]
    state: ReservationState
    created_at_ms: int
    expires_at_ms: int
    state_changed_at_ms: int
    # Units the commit took out of on_hand (empty unless COMMITTED).
    committed_lines: tuple[Line, ...] = field(default=())
    # The lsn of the record that created it: orders reservations by age.
    created_lsn: int = 0
    # The lsn of the record that committed, released or expired it (0 while active).
    finished_lsn: int = 0


def reservation_id_for(partition: int, lsn: int) -> str:
    """Ids carry their partition so any router can route a commit without a lookup."""
    return f"r{partition:04d}-{lsn:010d}"


def partition_of_reservation(reservation_id: str) -> int | None:
    """The partition encoded in a reservation id, or None if the id is not one of ours."""
    head, dash, lsn = reservation_id.partition("-")
    digits = head[1:]
    well_formed = head[:1] == "r" and dash and _ascii_number(digits) and _ascii_number(lsn)
    if not well_formed or len(reservation_id) > 32:
        return None
    partition = int(digits)
    return partition if partition < PARTITION_COUNT else None


def _ascii_number(text: str) -> bool:
    """Only 0-9: str.isdigit also accepts superscripts and other scripts' digits."""
    return text.isascii() and text.isdecimal()


@dataclass(frozen=True, slots=True)
class Consumed:
    """Units a bucket's reservations committed (took off the shelf), and when."""

    occurred_at_ms: int
    quantity: int


@dataclass(frozen=True, slots=True)
class Transfer:
    """Units on their way between a hot key's home and one of its buckets."""

    # "t<partition>-<lsn>" of the record that debited the source: unique, and the key its
    # credit is remembered under.
    transfer_id: str
    source: InventoryKey
    target: InventoryKey
    # The split's generation (the lsn of the record that split the key).
    generation: int
    # Free units moved: a grant's quota, or the free units a return gives back.
    quantity: int
    # A return's committed units, oldest first (a grant carries none).
    consumed: tuple[Consumed, ...] = ()
    # A return: the bucket's version once debited. The home's version absorbs its buckets'
    # versions when its last unit comes back (``Split.versions``).
    version: int = 0

    @property
    def consumed_units(self) -> int:
        return sum(c.quantity for c in self.consumed)

    @property
    def units(self) -> int:
        """What it takes off the home's ``allotted`` when a return is credited."""
        return self.quantity + self.consumed_units


def transfer_id_for(partition: int, lsn: int) -> str:
    return f"t{partition:04d}-{lsn:010d}"


@dataclass(frozen=True, slots=True)
class AvailabilityChanged:
    """One key's change, emitted for every change whatever made it (DESIGN section 8).

    The shell stamps committed_at when the record's batch is flushed.
    """

    key: InventoryKey
    partition: int
    lsn: int
    reason: ChangeReason
    before: StockRow
    after: StockRow
    recorded_at_ms: int

    @property
    def version(self) -> int:
        return self.after.version
