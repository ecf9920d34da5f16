"""Idempotency: the original answer to every accepted mutation, kept for its retries.

Keyed by (merchant_id, idempotency_key) and kept ``idempotency_retention_ms`` (DESIGN
section 6). A retry whose payload has the same fingerprint gets the original answer; the
same key with another payload is refused (``IdempotencyKeyReused``).

The fingerprint hashes the canonical encoding of the command without its time
(``_codec.canonical_bytes`` of the registry's encoding): a field added with a default leaves
every existing fingerprint as it was, so a deploy never turns a retry into a refusal.

Entries written by release 7de2ac4 carry that release's fingerprint, a hash of the
command's ``repr``; ``legacy_fingerprint`` recomputes it from the fields that release had,
written out here so that it cannot drift with the classes. Such entries are gone 24 h after
the upgrade; the legacy path can be deleted in the release after this one.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._codec import canonical_bytes, dataclass_codec
from ._model import InventoryKey, Line
from ._outcomes import Accepted, IdempotencyKeyReused, InsufficientStock, Outcome
from ._tables import Table, TableSchema

Scope = tuple[str, str]  # (merchant_id, idempotency_key)

FINGERPRINT_PREFIX = "c1:"  # canonical encoding, version 1


@dataclass(frozen=True, slots=True)
class IdempotencyEntry:
    """The original answer to a mutation, kept for retries with the same key."""

    merchant_id: str
    idempotency_key: str
    kind: str
    fingerprint: str
    # An accepted answer, or a refusal its command asked to keep (``Reserve.keep_refusal``).
    outcome: Accepted | InsufficientStock
    lsn: int
    recorded_at_ms: int


def _scope_to_data(scope: Scope) -> list[str]:
    return list(scope)


def _scope_from_data(data: Any) -> Scope:
    merchant_id, idempotency_key = data
    return (str(merchant_id), str(idempotency_key))


IDEMPOTENCY: TableSchema[Scope, IdempotencyEntry] = TableSchema(
    name="idempotency",
    key_to_data=_scope_to_data,
    key_from_data=_scope_from_data,
    row_to_data=dataclass_codec(IdempotencyEntry).encode,
    row_from_data=dataclass_codec(IdempotencyEntry).decode,
    restore_order=lambda entry: entry.lsn,  # live order: oldest first, forgotten first
)


# Fields that are not what is asked: the time it is applied at, and how to answer a refusal
# (``Reserve.keep_refusal``: a router's retry may set it where the first attempt did not).
_NOT_PAYLOAD = frozenset({"now_ms", "keep_refusal"})


def fingerprint(payload: dict[str, Any]) -> str:
    """Identity of a request's encoded payload, without its time: retries compare equal."""
    without_time = {k: v for k, v in payload.items() if k not in _NOT_PAYLOAD}
    digest = hashlib.blake2b(canonical_bytes(without_time), digest_size=16).hexdigest()
    return FINGERPRINT_PREFIX + digest


def answer(
    table: Table[Scope, IdempotencyEntry],
    scope: Scope,
    fingerprint_of: Callable[[], str],
    legacy_fingerprint_of: Callable[[], str],
) -> Outcome | None:
    """The original answer of a retry, a refusal of the key, or None: the command is new."""
    entry = table.get(scope)
    if entry is None:
        return None
    if entry.fingerprint.startswith(FINGERPRINT_PREFIX):
        same = entry.fingerprint == fingerprint_of()
    else:
        same = entry.fingerprint == legacy_fingerprint_of()
    return entry.outcome if same else IdempotencyKeyReused(scope[1], entry.kind)


# ------------------------------------------------------------------ release 7de2ac4


# The fields each command had in release 7de2ac4, in declaration order (now_ms last).
LEGACY_FIELDS: dict[str, tuple[str, ...]] = {
    "Reserve": ("merchant_id", "idempotency_key", "lines", "ttl_s"),
    "Commit": ("merchant_id", "idempotency_key", "reservation_id", "lines"),
    "Release": ("merchant_id", "idempotency_key", "reservation_id"),
    "Extend": ("merchant_id", "idempotency_key", "reservation_id", "ttl_s"),
    "AdjustStock": ("key", "idempotency_key", "delta", "reason", "occurred_at_ms"),
    "SetStock": ("key", "idempotency_key", "on_hand", "expected_version"),
    "SetSafetyStock": ("key", "idempotency_key", "safety_stock", "expected_version"),
}


def legacy_fingerprint(command: Any) -> str:
    """The fingerprint release 7de2ac4 stored: blake2b of the dataclass repr, now_ms=0."""
    name = type(command).__name__
    fields = LEGACY_FIELDS.get(name)
    if fields is None:  # a kind that release did not have: no entry can match
        return ""
    shown = ", ".join(f"{f}={_legacy_repr(getattr(command, f))}" for f in fields)
    text = f"{name}({shown}, now_ms=0)"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _legacy_repr(value: Any) -> str:
    match value:
        case InventoryKey():
            return (
                f"InventoryKey(merchant_id={value.merchant_id!r}, sku_id={value.sku_id!r}, "
                f"location_id={value.location_id!r})"
            )
        case Line():
            return f"Line(key={_legacy_repr(value.key)}, quantity={value.quantity!r})"
        case tuple():
            items = [_legacy_repr(v) for v in value]
            return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
        case enum.Enum():
            return f"<{type(value).__name__}.{value.name}: {value.value!r}>"
        case _:
            return repr(value)
