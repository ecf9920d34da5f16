"""Outcomes: what applying a command decided, as values.

Rejections are values, not exceptions; an exception out of the core is a bug. They are
listed in order of precedence: a command is checked for them in this order and gets the
first that applies.

    Invalid                 malformed input, with the field and the reason
    IdempotencyKeyReused    the key was used before with another payload
    CapacityExhausted       a stated bound of the partition is reached
    ReservationNotFound     no such reservation for this merchant
    ReservationNotActive    committed, released or expired already (state and when)
    VersionMismatch         compare-and-set refused (current version given)
    SplitConflict           a hot key's split does not allow it (the key and why)
    InsufficientStock       a reserve line exceeds available (requested and available per line)

Accepted outcomes: ``Reserved``, ``Committed``, ``Released``, ``Extended``, ``StockChanged``,
``Expired``, ``Ingested``, ``MarkedStale``, ``DeliveryExpected``, and a hot key's ``KeySplit``,
``QuotaSent``, ``QuotaReceived``, ``TransferSettled``. An ``Ingested`` answers
each event of a feed batch on its own (``EventAck``): applied, duplicate, superseded, or
refused with the field and the reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import get_args

from ._model import (
    FeedLocation,
    InventoryKey,
    Reservation,
    ReservationState,
    StockLevel,
    Transfer,
)


@dataclass(frozen=True, slots=True)
class Invalid:
    field: str
    reason: str


@dataclass(frozen=True, slots=True)
class IdempotencyKeyReused:
    idempotency_key: str
    original_kind: str


@dataclass(frozen=True, slots=True)
class CapacityExhausted:
    limit_name: str
    limit: int


@dataclass(frozen=True, slots=True)
class ReservationNotFound:
    reservation_id: str


@dataclass(frozen=True, slots=True)
class ReservationNotActive:
    reservation_id: str
    state: ReservationState
    state_changed_at_ms: int


@dataclass(frozen=True, slots=True)
class VersionMismatch:
    key: InventoryKey
    expected_version: int
    current_version: int


@dataclass(frozen=True, slots=True)
class SplitConflict:
    """A hot key's split does not allow the command: a grant while it merges, a transfer
    between keys that are not a key and one of its buckets, a return with nothing in it."""

    key: InventoryKey
    reason: str


@dataclass(frozen=True, slots=True)
class ShortLine:
    key: InventoryKey
    requested: int
    available: int


@dataclass(frozen=True, slots=True)
class InsufficientStock:
    # Every line of the request (summed per key), in request order.
    lines: tuple[ShortLine, ...]
    # Kept under the request's idempotency key (``Reserve.keep_refusal``): a retry gets it
    # again. A router walking a hot key's parts goes on past a kept refusal, as the walk
    # that kept it did.
    kept: bool = False


Rejection = (
    Invalid
    | IdempotencyKeyReused
    | CapacityExhausted
    | ReservationNotFound
    | ReservationNotActive
    | VersionMismatch
    | SplitConflict
    | InsufficientStock
)


@dataclass(frozen=True, slots=True)
class OverCommit:
    """A physical fact took available below zero: units promised online are not there."""

    exposure: int
    # Live reservations holding the key, newest first.
    reservations_at_risk: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Reserved:
    reservation: Reservation
    levels: tuple[StockLevel, ...]


@dataclass(frozen=True, slots=True)
class Committed:
    reservation: Reservation
    levels: tuple[StockLevel, ...]


@dataclass(frozen=True, slots=True)
class Released:
    reservation: Reservation
    levels: tuple[StockLevel, ...]


@dataclass(frozen=True, slots=True)
class Extended:
    reservation: Reservation


@dataclass(frozen=True, slots=True)
class StockChanged:
    level: StockLevel
    over_commit: OverCommit | None
    # The fact occurred before the key's last applied count, which already covers it: it is
    # recorded, and on_hand did not move (DESIGN section 9).
    superseded: bool = False


class AckStatus(enum.Enum):
    """What became of one feed event. All but REFUSED mean: durable, drop it from your buffer."""

    APPLIED = "applied"  # recorded, and on_hand moved as it says
    DUPLICATE = "duplicate"  # the same event (source, event_id) was recorded before
    SUPERSEDED = "superseded"  # recorded; a later count covers it, so on_hand did not move
    REFUSED = "refused"  # not recorded: the field and the reason say why (final)


@dataclass(frozen=True, slots=True)
class EventAck:
    status: AckStatus
    # REFUSED: the event's field ("kind", "key.merchant_id") and why; SUPERSEDED: why.
    field: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class OverCommitted:
    """A key left over-committed: its exposure and the live reservations at risk."""

    key: InventoryKey
    over_commit: OverCommit


@dataclass(frozen=True, slots=True)
class Ingested:
    # One per event, in the order of the command.
    acks: tuple[EventAck, ...]
    # The keys of this batch whose available is below zero after it, in first-seen order.
    over_committed: tuple[OverCommitted, ...] = ()
    # The heartbeat's locations whose health the record keeps (a heartbeat soon after the
    # last one changes nothing and is not kept).
    alive_at: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryExpected:
    # The keys of the notice (and of the one it replaced), as they stand after it.
    levels: tuple[StockLevel, ...]


@dataclass(frozen=True, slots=True)
class MarkedStale:
    """The locations the timer's record marked stale (none: nothing was due after all)."""

    locations: tuple[FeedLocation, ...]


@dataclass(frozen=True, slots=True)
class KeySplit:
    """A hot key's split as it stands: its buckets (none: the key is whole), the split's
    generation (0: whole), whether it is merging, and the home's level."""

    level: StockLevel
    buckets: tuple[InventoryKey, ...] = ()
    generation: int = 0
    merging: bool = False


@dataclass(frozen=True, slots=True)
class HotKeyPart:
    """One part of a hot key as its partition holds it: at the home, its split; at a bucket,
    its home and what it was granted. Either way, the transfers it has debited and not yet
    settled. (A read, not an outcome of a command.)"""

    level: StockLevel
    split: KeySplit | None = None
    home: InventoryKey | None = None
    granted: int = 0
    sending: tuple[Transfer, ...] = ()


@dataclass(frozen=True, slots=True)
class QuotaSent:
    """A transfer debited at its source: credit it at its target (``ReceiveQuota``), then
    settle it here (``SettleTransfer``)."""

    transfer: Transfer
    level: StockLevel


@dataclass(frozen=True, slots=True)
class QuotaReceived:
    """A transfer credited at its target (once, however often it is carried)."""

    transfer_id: str
    level: StockLevel
    # A return that brought a merging key's last unit home: the key is whole again.
    merged: bool = False


@dataclass(frozen=True, slots=True)
class TransferSettled:
    transfer_id: str
    # False: the source had forgotten it already (settled before); nothing changed.
    settled: bool


@dataclass(frozen=True, slots=True)
class Expired:
    reservation_ids: tuple[str, ...]


Accepted = (
    Reserved
    | Committed
    | Released
    | Extended
    | StockChanged
    | Expired
    | Ingested
    | MarkedStale
    | DeliveryExpected
    | KeySplit
    | QuotaSent
    | QuotaReceived
    | TransferSettled
)
Outcome = Accepted | Rejection


_ACCEPTED_TYPES = get_args(Accepted)


def is_accepted(outcome: Outcome) -> bool:
    return isinstance(outcome, _ACCEPTED_TYPES)
