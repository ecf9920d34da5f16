"""Commands: everything that can change a partition, as plain values.

A command carries the time it is applied at (``now_ms``, Unix epoch milliseconds, stamped by
the shell) so that applying it is deterministic; the ledger stores the command itself, and
replay applies the same command again. ``Expire`` is issued by the core itself when a
command finds reservations past their expiry, and by the shell's expiry timer.

Each kind has one row in ``_registry.py`` (its name, validator and handler); its encoding is
derived from its fields (``_codec.py``), so a field added with a default changes neither old
records nor fingerprints.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._model import AdjustmentReason, InventoryKey, Line


@dataclass(frozen=True, slots=True)
class Reserve:
    merchant_id: str
    idempotency_key: str
    lines: tuple[Line, ...]
    ttl_s: int
    now_ms: int


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
class Expire:
    """Expire the listed reservations, each due at or before now_ms."""

    reservation_ids: tuple[str, ...]
    now_ms: int


# Commands a client sends; each is scoped to a merchant and carries an idempotency key.
ClientCommand = Reserve | Commit | Release | Extend | AdjustStock | SetStock | SetSafetyStock
Command = ClientCommand | Expire
