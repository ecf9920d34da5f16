"""Incoming stock: suppliers' expected deliveries, and the receipts that fulfil them.

An ``ExpectDelivery`` sets a delivery's expectation whole: its units per key at one
location, and its ETA (an updated notice replaces the last; no lines cancels it). Reads
and Watch show each key's ``incoming`` units and their earliest ETA; they are never part
of available, so nothing is promised online before it is on the shelf. A feed's receipt
that names the delivery (``FeedEvent.delivery_id``) is recorded as any receipt (on_hand
moves, or a later count covers it) and its units of that key are no longer incoming; a
delivery leaves the table once nothing of it is left to receive. A receipt for more than
was expected empties the line (the surplus is on the shelf all the same); one naming a
delivery not (or no longer) expected for that key just applies.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import _limits as limits
from .._commands import ExpectDelivery
from .._deliveries import Delivery
from .._model import ChangeReason, InventoryKey, Line
from .._outcomes import CapacityExhausted, DeliveryExpected, Outcome
from .._state import Effects, PartitionState, levels_of


def expect_delivery(state: PartitionState, command: ExpectDelivery, at: Effects) -> Outcome:
    delivery_id = (command.merchant_id, command.delivery_id)
    found = state.deliveries.get(delivery_id)
    if found is None and command.lines and len(state.deliveries) >= limits.deliveries_max:
        return CapacityExhausted("deliveries_max", limits.deliveries_max)
    new_keys = [line.key for line in command.lines if line.key not in state.stock]
    for pending in range(len(new_keys)):
        refused = state.refuse_new_key(pending=pending)
        if refused is not None:
            return refused
    before = found.lines if found is not None else ()
    _unindex(state, command.delivery_id, before)
    if command.lines:
        state.deliveries.put(
            delivery_id, Delivery(command.location_id, command.lines, command.eta_ms)
        )
        for line in command.lines:
            state.incoming.setdefault(line.key, {})[command.delivery_id] = line.quantity
    elif found is not None:
        state.deliveries.remove(delivery_id)
    keys = list(dict.fromkeys(line.key for line in (*command.lines, *before)))
    refresh(state, at, keys, ChangeReason.INCOMING)
    return DeliveryExpected(levels_of(state, keys))


def receive(
    state: PartitionState, received: dict[tuple[str, InventoryKey], int]
) -> set[InventoryKey]:
    """Receipts of a feed record: units per (delivery_id, key), now no longer incoming. The
    keys whose incoming changed; the caller writes their rows (one change per key)."""
    changed = set()
    for (delivery_name, key), units in received.items():
        delivery_id = (key.merchant_id, delivery_name)
        delivery = state.deliveries.get(delivery_id)
        expecting = state.incoming.get(key, {})
        if delivery is None or delivery_name not in expecting:
            continue  # not expected for this key: the receipt just applies
        left = expecting[delivery_name] - units
        lines = tuple(
            Line(line.key, left) if line.key == key else line
            for line in delivery.lines
            if line.key != key or left > 0
        )
        _unindex(state, delivery_name, [Line(key, expecting[delivery_name])])
        if left > 0:
            state.incoming.setdefault(key, {})[delivery_name] = left
        if lines:
            state.deliveries.put(
                delivery_id, Delivery(delivery.location_id, lines, delivery.eta_ms)
            )
        else:
            state.deliveries.remove(delivery_id)
        changed.add(key)
    return changed


def incoming_counts(state: PartitionState, key: InventoryKey) -> dict[str, int]:
    """The row counts that show the key's deliveries as they stand."""
    units, eta_ms = state.incoming_of(key)
    return {"incoming": units, "incoming_eta_ms": eta_ms}


def refresh(
    state: PartitionState, at: Effects, keys: Iterable[InventoryKey], reason: ChangeReason
) -> None:
    """Write each key's incoming into its row where it changed (creating the row of a key
    expected for the first time)."""
    for key in keys:
        counts = incoming_counts(state, key)
        row = state.stock.get(key)
        shown = (row.incoming, row.incoming_eta_ms) if row else (0, 0)
        if shown != (counts["incoming"], counts["incoming_eta_ms"]):
            state.change(key, at, reason, **counts)


def _unindex(state: PartitionState, delivery_name: str, lines: Iterable[Line]) -> None:
    for line in lines:
        expecting = state.incoming.get(line.key)
        if expecting is not None:
            expecting.pop(delivery_name, None)
            if not expecting:
                del state.incoming[line.key]
