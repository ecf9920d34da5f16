"""Physical counts: deltas, absolute sets and safety stock (DESIGN section 2).

Physical facts always apply, even when they take available below zero: the till already
sold the item. The key is then over-committed and the answer says by how much and which
live reservations are at risk, newest first. ``expected_version`` makes a set a
compare-and-set; a set that changes nothing still answers (and is remembered) but emits no
event and keeps the version.
"""

from __future__ import annotations

from .. import _limits as limits
from .._commands import AdjustStock, SetSafetyStock, SetStock
from .._model import EMPTY_ROW, ChangeReason, InventoryKey, StockRow
from .._outcomes import Invalid, Outcome, StockChanged, VersionMismatch
from .._state import Effects, PartitionState


def adjust_stock(state: PartitionState, command: AdjustStock, at: Effects) -> Outcome:
    row = state.stock.get(command.key) or EMPTY_ROW
    on_hand = row.on_hand + command.delta
    if abs(on_hand) > limits.stock_quantity_max:
        return Invalid("delta", f"on_hand would leave ±{limits.stock_quantity_max}")
    assert command.reason is not None, "validated"
    reason = ChangeReason(command.reason.value)
    return _set(state, at, command.key, reason, on_hand=on_hand, safety_stock=row.safety_stock)


def set_stock(state: PartitionState, command: SetStock, at: Effects) -> Outcome:
    row = state.stock.get(command.key) or EMPTY_ROW
    return _set(
        state,
        at,
        command.key,
        ChangeReason.SET_STOCK,
        on_hand=command.on_hand,
        safety_stock=row.safety_stock,
        expected_version=command.expected_version,
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
