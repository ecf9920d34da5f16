"""Commands: everything that can change a partition, as plain values.

A command carries the time it is applied at (``now_ms``, Unix epoch milliseconds, stamped by
the shell) so that applying it is deterministic; the ledger stores the command itself, and
replay applies the same command again. ``Expire`` is issued by the core itself when a
command finds reservations past their expiry, and by the shell's expiry timer; ``MarkStale``
by the shell's timer when locations' feeds have fallen silent.

Each kind has one row in ``_registry.py`` (its name, validator and handler); its encoding is
derived from its fields (``_codec.py``), so a field added with a default changes neither old
records nor fingerprints.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _limits as limits
from ._model import AdjustmentReason, FeedEventKind, FeedLocation, InventoryKey, Line, Transfer


@dataclass(frozen=True, slots=True)
class Reserve:
    merchant_id: str
    idempotency_key: str
    lines: tuple[Line, ...]
    ttl_s: int
    now_ms: int
    # A refusal for insufficient stock is recorded and remembered under the idempotency key
    # like an answer, so a retry gets it again. The router asks for it on a hot key's bucket
    # before it tries the next one: a retry that walks the buckets again then finds every
    # answer the first walk got, and never takes units twice (DESIGN section 10).
    keep_refusal: bool = False


@dataclass(frozen=True, slots=True)
class Commit:
    merchant_id: str
    idempotency_key: str
    reservation_id: str
    # Empty: commit everything held. Otherwise the quantity per key; the rest is released.
    lines: tuple[Line, ...]
    now_ms: int


@dataclass(frozen=True, slots=True)
class Release:
    merchant_id: str
    idempotency_key: str
    reservation_id: str
    now_ms: int


@dataclass(frozen=True, slots=True)
class Extend:
    merchant_id: str
    idempotency_key: str
    reservation_id: str
    ttl_s: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class AdjustStock:
    key: InventoryKey
    idempotency_key: str
    delta: int
    # None when the caller named no reason: refused by validation, never applied.
    reason: AdjustmentReason | None
    # When the physical fact happened; kept for feeds (DESIGN section 9).
    occurred_at_ms: int
    now_ms: int

    @property
    def merchant_id(self) -> str:
        return self.key.merchant_id


@dataclass(frozen=True, slots=True)
class SetStock:
    key: InventoryKey
    idempotency_key: str
    on_hand: int
    expected_version: int | None
    now_ms: int

    @property
    def merchant_id(self) -> str:
        return self.key.merchant_id


@dataclass(frozen=True, slots=True)
class SetSafetyStock:
    key: InventoryKey
    idempotency_key: str
    safety_stock: int
    expected_version: int | None
    now_ms: int

    @property
    def merchant_id(self) -> str:
        return self.key.merchant_id


@dataclass(frozen=True, slots=True)
class ExpectDelivery:
    """A supplier's notice of a delivery to one location: its units per key and its ETA.

    Sets the delivery's expectation whole (an updated notice replaces the last one); no
    lines cancels it. Its receipts (feed events naming ``delivery_id``) turn it into on_hand.
    """

    merchant_id: str
    idempotency_key: str
    delivery_id: str
    location_id: str
    # Keys at the location, each once, with the units expected.
    lines: tuple[Line, ...]
    eta_ms: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One fact from a POS gateway or a supplier feed (DESIGN section 9)."""

    # The dedupe key within the sender's source: the same event sent again is applied once.
    event_id: str
    # None when the sender named no kind we know: refused, never applied.
    kind: FeedEventKind | None
    key: InventoryKey
    # When it happened at the store (Unix epoch ms): what orders counts and deltas.
    occurred_at_ms: int
    # Units moved: positive for sale, return and receipt; signed for an adjustment; 0 (unset)
    # for a count.
    quantity: int = 0
    # A count's absolute on_hand (None for every other kind).
    count: int | None = None
    # Free text for the audit trail.
    reason: str = ""
    # A receipt's expected delivery (``ExpectDelivery``): its units of this key are no longer
    # incoming once it is recorded ("" for none).
    delivery_id: str = ""


@dataclass(frozen=True, slots=True)
class Ingest:
    """A sender's events for keys of one partition, each acknowledged on its own.

    Not remembered by idempotency key: every event is de-duplicated by (merchant, source,
    event_id) instead, so a batch may be re-sent whole or in part, in any order. The ledger
    record holds only the events it recorded (applied or superseded).
    """

    merchant_id: str
    source: str
    events: tuple[FeedEvent, ...]
    now_ms: int
    # Tags the records of a bulk import, so that a rebuild can leave them out ("" for none).
    batch_id: str = ""
    # A heartbeat: the merchant's locations (of this partition) the source is up at, with
    # nothing more to send; it keeps them from going stale (``_health.py``).
    alive_at: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MarkStale:
    """The feed timer's: hold back a buffer at these locations, silent past the threshold.

    Issued by the shell's timer with the locations the core found due (``stale_due``);
    each is checked again when applied, and the record keeps only those it marked.
    """

    locations: tuple[FeedLocation, ...]
    now_ms: int
    # The silence that makes a location stale: the deployment's setting, kept in the record
    # so that a replay under another setting marks the same locations.
    silent_ms: int = limits.feed_silence_stale_ms


@dataclass(frozen=True, slots=True)
class SplitKey:
    """Split a hot key at its home into buckets (DESIGN section 10; ``_buckets.py``).

    Each number names a bucket, a key of its own (``bucket_key``) whose partition the caller
    chose on another owner than the home's and the other buckets'. A key already split keeps
    its buckets (a split that was merging is split again): the answer says which it has.
    """

    key: InventoryKey
    idempotency_key: str
    buckets: tuple[int, ...]
    now_ms: int

    @property
    def merchant_id(self) -> str:
        return self.key.merchant_id


@dataclass(frozen=True, slots=True)
class MergeKey:
    """Merge a hot key's buckets back into its home: no more grants; the split row goes once
    the buckets have returned every unit (at once if they hold none)."""

    key: InventoryKey
    idempotency_key: str
    now_ms: int

    @property
    def merchant_id(self) -> str:
        return self.key.merchant_id


@dataclass(frozen=True, slots=True)
class SendQuota:
    """Debit a transfer at its source (``key``): at a hot key's home, a grant of
    ``quantity`` units to one of its buckets; at a bucket, a return of ``quantity`` free units
    to its home, with every unit its reservations committed since its last return."""

    key: InventoryKey
    idempotency_key: str
    target: InventoryKey
    quantity: int
    now_ms: int

    @property
    def merchant_id(self) -> str:
        return self.key.merchant_id


@dataclass(frozen=True, slots=True)
class ReceiveQuota:
    """Credit a transfer at its target, once: its answer is remembered under its id."""

    transfer: Transfer
    now_ms: int

    @property
    def merchant_id(self) -> str:
        return self.transfer.target.merchant_id

    @property
    def idempotency_key(self) -> str:
        return f"transfer:{self.transfer.transfer_id}"


@dataclass(frozen=True, slots=True)
class SettleTransfer:
    """The source forgets a transfer its target has credited (nothing if it had already)."""

    key: InventoryKey
    transfer_id: str
    now_ms: int

    @property
    def merchant_id(self) -> str:
        return self.key.merchant_id


@dataclass(frozen=True, slots=True)
class Expire:
    """Expire the listed reservations, each due at or before now_ms."""

    reservation_ids: tuple[str, ...]
    now_ms: int


# Commands that carry an idempotency key: their answers are remembered for retries.
KeyedCommand = (
    Reserve
    | Commit
    | Release
    | Extend
    | AdjustStock
    | SetStock
    | SetSafetyStock
    | ExpectDelivery
    | SplitKey
    | MergeKey
    | SendQuota
    | ReceiveQuota
)
# Commands a client sends; each is scoped to a merchant.
ClientCommand = KeyedCommand | Ingest | SettleTransfer
Command = ClientCommand | Expire | MarkStale
