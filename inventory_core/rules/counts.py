"""Physical counts: deltas, absolute sets and safety stock (DESIGN section 2).

Physical facts always apply, even when they take available below zero: the till already
sold the item. The key is then over-committed and the answer says by how much and which
live reservations are at risk, newest first. ``expected_version`` makes a set a
compare-and-set; a set that changes nothing still answers (and is remembered) but emits no
event and keeps the version.

Both are physical facts of the key's history (``rules/feeds.py``), ordered by when they are
applied: an adjustment is a delta now and a set is a count now, so a late count from a feed
accounts for them. (An adjustment's ``occurred_at_ms`` is kept for the audit trail but does
not order it: facts that carry their own time arrive through ``Ingest``, and records logged
before feeds existed must replay exactly as they were applied.) Only a feed count dated
ahead of now (a till's clock running fast) can cover them: they are then recorded as
superseded without moving on_hand.
"""

from __future__ import annotations

from .. import _limits as limits
from .._commands import AdjustStock, SetSafetyStock, SetStock
from .._model import EMPTY_ROW, ChangeReason, InventoryKey, StockRow
from .._outcomes import Invalid, Outcome, StockChanged, VersionMismatch
from .._state import Effects, PartitionState
from . import feeds


def adjust_stock(state: PartitionState, command: AdjustStock, at: Effects) -> Outcome:
    key = command.key
    found = state.stock.get(key)
    refused = state.refuse_new_key() if found is None else None
    if refused is not None:
        return refused
    row = found or EMPTY_ROW
    if abs(row.on_hand + command.delta) > limits.stock_quantity_max:
        return Invalid("delta", f"on_hand would leave ±{limits.stock_quantity_max}")
    assert command.reason is not None, "validated"
    moved = feeds.own_delta(state, key, at, command.delta, occurred_at_ms=at.now_ms, kind="adjust")
    if moved == 0:
        return _superseded(state, key)
    reason = ChangeReason(command.reason.value)
    return _set(state, at, key, reason, on_hand=row.on_hand + moved, safety_stock=row.safety_stock)


def set_stock(state: PartitionState, command: SetStock, at: Effects) -> Outcome:
    key = command.key
    found = state.stock.get(key)
    refused = state.refuse_new_key() if found is None else None
    if refused is not None:
        return refused
    row = found or EMPTY_ROW
    expected = command.expected_version
    if expected is not None and expected != row.version:
        return VersionMismatch(key, expected, row.version)
    on_hand = feeds.own_count(state, key, at, command.on_hand)
    if on_hand is None:
        return _superseded(state, key)
    if abs(on_hand) > limits.stock_quantity_max:
        bound = limits.stock_quantity_max
        return Invalid(
            "on_hand", f"with the deltas that occurred after it, on_hand leaves ±{bound}"
        )
    return _set(
        state, at, key, ChangeReason.SET_STOCK, on_hand=on_hand, safety_stock=row.safety_stock
    )


def set_safety_stock(state: PartitionState, command: SetSafetyStock, at: Effects) -> Outcome:
    row = state.stock.get(command.key) or EMPTY_ROW
    return _set(
        state,
        at,
        command.key,
        ChangeReason.SET_SAFETY_STOCK,
        on_hand=row.on_hand,
        safety_stock=command.safety_stock,
        expected_version=command.expected_version,
    )


def _set(
    state: PartitionState,
    at: Effects,
    key: InventoryKey,
    reason: ChangeReason,
    *,
    on_hand: int,
    safety_stock: int,
    expected_version: int | None = None,
) -> Outcome:
    row: StockRow | None = state.stock.get(key)
    refused = state.refuse_new_key() if row is None else None
    if refused is not None:
        return refused
    current = row or EMPTY_ROW
    if expected_version is not None and expected_version != current.version:
        return VersionMismatch(key, expected_version, current.version)
    if row is None or (on_hand, safety_stock) != (row.on_hand, row.safety_stock):
        state.change(key, at, reason, on_hand=on_hand, safety_stock=safety_stock)
    return StockChanged(state.level(key), state.over_commit(key))


def _superseded(state: PartitionState, key: InventoryKey) -> StockChanged:
    """A fact a later count already covers: recorded, and nothing moved."""
    return StockChanged(state.level(key), state.over_commit(key), superseded=True)
