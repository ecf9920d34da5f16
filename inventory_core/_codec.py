"""Plain-data forms of commands, reservations and answers, for the ledger and checkpoints.

``to_data`` gives dicts, lists, strings and ints only (JSON-ready); ``*_from_data`` is its
exact inverse, and checks what it reads: a record that does not decode is corruption.
A round trip is the identity (tests/core/test_codec.py).
"""

from __future__ import annotations

from typing import Any

from ._commands import (
    AdjustStock,
    Command,
    Commit,
    Expire,
    Extend,
    Release,
    Reserve,
    SetSafetyStock,
    SetStock,
    kind_of,
)
from ._model import (
    AdjustmentReason,
    AvailabilityChanged,
    ChangeReason,
    InventoryKey,
    Line,
    Reservation,
    ReservationState,
    StockLevel,
    StockRow,
)
from ._outcomes import (
    Accepted,
    Committed,
    Expired,
    Extended,
    OverCommit,
    Released,
    Reserved,
    StockChanged,
)

Data = dict[str, Any]


def key_to_data(key: InventoryKey) -> list[str]:
    return [key.merchant_id, key.sku_id, key.location_id]


def key_from_data(data: Any) -> InventoryKey:
    merchant_id, sku_id, location_id = data
    return InventoryKey(str(merchant_id), str(sku_id), str(location_id))


def lines_to_data(lines: tuple[Line, ...]) -> list[Any]:
    return [[key_to_data(line.key), line.quantity] for line in lines]


def lines_from_data(data: Any) -> tuple[Line, ...]:
    return tuple(Line(key_from_data(key), int(quantity)) for key, quantity in data)


# ------------------------------------------------------------------------------ commands


def command_to_data(command: Command) -> Data:
    data: Data = {"kind": kind_of(command), "now_ms": command.now_ms}
    match command:
        case Reserve():
            data |= _scope(command) | {
                "lines": lines_to_data(command.lines),
                "ttl_s": command.ttl_s,
            }
        case Commit():
            data |= _scope(command) | {
                "reservation_id": command.reservation_id,
                "lines": lines_to_data(command.lines),
            }
        case Release():
            data |= _scope(command) | {"reservation_id": command.reservation_id}
        case Extend():
            data |= _scope(command) | {
                "reservation_id": command.reservation_id,
                "ttl_s": command.ttl_s,
            }
        case AdjustStock():
            data |= {
                "key": key_to_data(command.key),
                "idempotency_key": command.idempotency_key,
                "delta": command.delta,
                "reason": None if command.reason is None else command.reason.value,
                "occurred_at_ms": command.occurred_at_ms,
            }
        case SetStock():
            data |= {
                "key": key_to_data(command.key),
                "idempotency_key": command.idempotency_key,
                "on_hand": command.on_hand,
                "expected_version": command.expected_version,
            }
        case SetSafetyStock():
            data |= {
                "key": key_to_data(command.key),
                "idempotency_key": command.idempotency_key,
                "safety_stock": command.safety_stock,
                "expected_version": command.expected_version,
            }
        case Expire():
            data["reservation_ids"] = list(command.reservation_ids)
    return data


def command_from_data(data: Data) -> Command:
    kind, now_ms = data["kind"], int(data["now_ms"])
    match kind:
        case "reserve":
            return Reserve(
                data["merchant_id"],
                data["idempotency_key"],
                lines_from_data(data["lines"]),
                int(data["ttl_s"]),
                now_ms,
            )
        case "commit":
            return Commit(
                data["merchant_id"],
                data["idempotency_key"],
                data["reservation_id"],
                lines_from_data(data["lines"]),
                now_ms,
            )
        case "release":
            return Release(
                data["merchant_id"], data["idempotency_key"], data["reservation_id"], now_ms
            )
        case "extend":
            return Extend(
                data["merchant_id"],
                data["idempotency_key"],
                data["reservation_id"],
                int(data["ttl_s"]),
                now_ms,
            )
        case "adjust_stock":
            return AdjustStock(
                key_from_data(data["key"]),
                data["idempotency_key"],
                int(data["delta"]),
                AdjustmentReason(data["reason"]),
                int(data["occurred_at_ms"]),
                now_ms,
            )
        case "set_stock":
            return SetStock(
                key_from_data(data["key"]),
                data["idempotency_key"],
                int(data["on_hand"]),
                _optional_int(data["expected_version"]),
                now_ms,
            )
        case "set_safety_stock":
            return SetSafetyStock(
                key_from_data(data["key"]),
                data["idempotency_key"],
                int(data["safety_stock"]),
                _optional_int(data["expected_version"]),
                now_ms,
            )
        case "expire":
            return Expire(tuple(str(i) for i in data["reservation_ids"]), now_ms)
    raise ValueError(f"unknown record kind {kind!r}")


def _scope(command: Reserve | Commit | Release | Extend) -> Data:
    return {"merchant_id": command.merchant_id, "idempotency_key": command.idempotency_key}


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# ------------------------------------------------------------------------ state values


def row_to_data(row: StockRow) -> list[int]:
    return [row.on_hand, row.reserved, row.safety_stock, row.version]


def row_from_data(data: Any) -> StockRow:
    on_hand, reserved, safety_stock, version = (int(v) for v in data)
    return StockRow(on_hand, reserved, safety_stock, version)


def reservation_to_data(reservation: Reservation) -> Data:
    return {
        "reservation_id": reservation.reservation_id,
        "merchant_id": reservation.merchant_id,
        "location_id": reservation.location_id,
        "lines": lines_to_data(reservation.lines),
        "state": reservation.state.value,
        "created_at_ms": reservation.created_at_ms,
        "expires_at_ms": reservation.expires_at_ms,
        "state_changed_at_ms": reservation.state_changed_at_ms,
        "committed_lines": lines_to_data(reservation.committed_lines),
        "created_lsn": reservation.created_lsn,
        "finished_lsn": reservation.finished_lsn,
    }


def reservation_from_data(data: Data) -> Reservation:
    return Reservation(
        reservation_id=str(data["reservation_id"]),
        merchant_id=str(data["merchant_id"]),
        location_id=str(data["location_id"]),
        lines=lines_from_data(data["lines"]),
        state=ReservationState(data["state"]),
        created_at_ms=int(data["created_at_ms"]),
        expires_at_ms=int(data["expires_at_ms"]),
        state_changed_at_ms=int(data["state_changed_at_ms"]),
        committed_lines=lines_from_data(data["committed_lines"]),
        created_lsn=int(data["created_lsn"]),
        finished_lsn=int(data["finished_lsn"]),
    )


def level_to_data(level: StockLevel) -> Data:
    return {
        "key": key_to_data(level.key),
        "row": [level.on_hand, level.reserved, level.safety_stock, level.version],
        "exists": level.exists,
    }


def level_from_data(data: Data) -> StockLevel:
    row = row_from_data(data["row"])
    return StockLevel.of(key_from_data(data["key"]), row if data["exists"] else None)


# ------------------------------------------------------------------------------ answers


def outcome_to_data(outcome: Accepted) -> Data:
    match outcome:
        case Reserved() | Committed() | Released():
            return {
                "kind": type(outcome).__name__,
                "reservation": reservation_to_data(outcome.reservation),
                "levels": [level_to_data(level) for level in outcome.levels],
            }
        case Extended():
            return {"kind": "Extended", "reservation": reservation_to_data(outcome.reservation)}
        case StockChanged():
            over = outcome.over_commit
            return {
                "kind": "StockChanged",
                "level": level_to_data(outcome.level),
                "over_commit": None
                if over is None
                else [over.exposure, list(over.reservations_at_risk)],
            }
        case Expired():
            return {"kind": "Expired", "reservation_ids": list(outcome.reservation_ids)}


def outcome_from_data(data: Data) -> Accepted:
    kind = data["kind"]
    match kind:
        case "Reserved" | "Committed" | "Released":
            reservation = reservation_from_data(data["reservation"])
            levels = tuple(level_from_data(level) for level in data["levels"])
            if kind == "Reserved":
                return Reserved(reservation, levels)
            if kind == "Committed":
                return Committed(reservation, levels)
            return Released(reservation, levels)
        case "Extended":
            return Extended(reservation_from_data(data["reservation"]))
        case "StockChanged":
            over = data["over_commit"]
            return StockChanged(
                level_from_data(data["level"]),
                None if over is None else OverCommit(int(over[0]), tuple(over[1])),
            )
        case "Expired":
            return Expired(tuple(data["reservation_ids"]))
    raise ValueError(f"unknown outcome kind {kind!r}")


# ------------------------------------------------------------------------------- events


def event_to_data(event: AvailabilityChanged) -> list[Any]:
    """Compact: [key, before row, after row, reason, recorded_at_ms] (partition/lsn implied)."""
    return [
        key_to_data(event.key),
        row_to_data(event.before),
        row_to_data(event.after),
        event.reason.value,
        event.recorded_at_ms,
    ]


def event_from_data(data: Any, partition: int, lsn: int) -> AvailabilityChanged:
    key, before, after, reason, recorded_at_ms = data
    return AvailabilityChanged(
        key_from_data(key),
        partition,
        lsn,
        ChangeReason(reason),
        row_from_data(before),
        row_from_data(after),
        int(recorded_at_ms),
    )
