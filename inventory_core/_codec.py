"""Plain data for every value the core keeps or logs, derived from the dataclasses themselves.

One mechanism encodes commands, reservations, outcomes and idempotency entries: a value's
dataclass fields, each by its type (ints and strings as they are, enums by value, tuples as
lists, optional values as null, nested dataclasses as objects), with compact forms for the
small nouns that appear by the thousand (a key is ``[merchant, sku, location]``, a row
``[on_hand, reserved, safety_stock, version]``, a line ``[key, quantity]``, a feed event a
list of its fields). So a new
command, outcome or table value needs no codec code of its own.

Two rules keep old records readable and fingerprints stable:
  - a field whose value equals its declared default is left out, and a field missing on
    decode takes its default: adding a defaulted field changes no existing encoding;
  - decoding checks what it reads; a record that does not decode is corruption.

``canonical_bytes`` is the one byte form of such data (sorted keys, length-prefixed): what
the idempotency fingerprint hashes, independent of field order or JSON spacing.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from ._commands import FeedEvent
from ._model import (
    AvailabilityChanged,
    ChangeReason,
    FeedEventKind,
    FeedLocation,
    InventoryKey,
    Line,
    Reservation,
    StockLevel,
    StockRow,
)
from ._outcomes import Accepted, OverCommit

Data = dict[str, Any]
T = TypeVar("T")

Encode = Callable[[Any], Any]
Decode = Callable[[Any], Any]


# ------------------------------------------------------------------------ compact nouns


def key_to_data(key: InventoryKey) -> list[str]:
    return [key.merchant_id, key.sku_id, key.location_id]


def key_from_data(data: Any) -> InventoryKey:
    merchant_id, sku_id, location_id = data
    return InventoryKey(str(merchant_id), str(sku_id), str(location_id))


def row_to_data(row: StockRow) -> list[int]:
    """``[on_hand, reserved, safety_stock, version, stale_buffer, stale_since_ms, incoming,
    incoming_eta_ms, allotted]``, trailing zeros left out: a live key with nothing incoming
    and no buckets is four numbers, as rows were before staleness, deliveries and hot keys
    (they decode as such)."""
    return _trimmed(
        [
            row.on_hand,
            row.reserved,
            row.safety_stock,
            row.version,
            row.stale_buffer,
            row.stale_since_ms,
            row.incoming,
            row.incoming_eta_ms,
            row.allotted,
        ]
    )


def _trimmed(data: list[int]) -> list[int]:
    while len(data) > _ROW_FIELDS_MIN and data[-1] == 0:
        data.pop()
    return data


def row_from_data(data: Any) -> StockRow:
    if not _ROW_FIELDS_MIN <= len(data) <= _ROW_FIELDS_MAX:
        raise ValueError(f"a stock row has 4 to 9 fields, got {data!r}")
    return StockRow(*(integer(v) for v in data))


_ROW_FIELDS_MIN, _ROW_FIELDS_MAX = 4, 9


def location_to_data(location: FeedLocation) -> list[str]:
    return [location.merchant_id, location.location_id]


def location_from_data(data: Any) -> FeedLocation:
    merchant_id, location_id = data
    return FeedLocation(_str(merchant_id), _str(location_id))


def _line_to_data(line: Line) -> list[Any]:
    return [key_to_data(line.key), line.quantity]


def _line_from_data(data: Any) -> Line:
    key, quantity = data
    return Line(key_from_data(key), integer(quantity))


def _level_to_data(level: StockLevel) -> Data:
    row = _trimmed(
        [
            level.on_hand,
            level.reserved,
            level.safety_stock,
            level.version,
            level.stale_buffer,
            level.stale_since_ms,
            level.incoming,
            level.incoming_eta_ms,
            level.allotted,
        ]
    )
    return {"key": key_to_data(level.key), "row": row, "exists": level.exists}


def _level_from_data(data: Data) -> StockLevel:
    row = row_from_data(data["row"])
    return StockLevel.of(key_from_data(data["key"]), row if data["exists"] else None)


def _over_commit_to_data(over: OverCommit) -> list[Any]:
    return [over.exposure, list(over.reservations_at_risk)]


def _over_commit_from_data(data: Any) -> OverCommit:
    exposure, at_risk = data
    return OverCommit(integer(exposure), tuple(str(r) for r in at_risk))


def _feed_event_to_data(event: FeedEvent) -> list[Any]:
    """``[event_id, kind, key, occurred_at_ms, quantity, count, reason, delivery_id]``,
    trailing defaults left out: a feed's record holds hundreds of these (a generic object of
    fields cost ~4 µs an event to encode)."""
    data = [
        event.event_id,
        None if event.kind is None else event.kind.value,
        key_to_data(event.key),
        event.occurred_at_ms,
        event.quantity,
        event.count,
        event.reason,
        event.delivery_id,
    ]
    while len(data) > 4 and data[-1] == _FEED_EVENT_DEFAULTS[len(data) - 5]:
        data.pop()
    return data


# The defaults of quantity, count, reason and delivery_id, in that order.
_FEED_EVENT_DEFAULTS: tuple[Any, ...] = (0, None, "", "")


def _feed_event_from_data(data: Any) -> FeedEvent:
    if not 4 <= len(data) <= 8:
        raise ValueError(f"a feed event has 4 to 8 fields, got {data!r}")
    event_id, kind, key, occurred_at_ms = data[:4]
    quantity, count, reason, delivery_id = list(data[4:]) + list(
        _FEED_EVENT_DEFAULTS[len(data) - 4 :]
    )
    return FeedEvent(
        _str(event_id),
        None if kind is None else FeedEventKind(kind),
        key_from_data(key),
        integer(occurred_at_ms),
        integer(quantity),
        None if count is None else integer(count),
        _str(reason),
        _str(delivery_id),
    )


# Values with a form of their own; every other dataclass is an object of its fields.
_COMPACT: dict[type[Any], tuple[Encode, Decode]] = {
    InventoryKey: (key_to_data, key_from_data),
    StockRow: (row_to_data, row_from_data),
    Line: (_line_to_data, _line_from_data),
    StockLevel: (_level_to_data, _level_from_data),
    OverCommit: (_over_commit_to_data, _over_commit_from_data),
    FeedEvent: (_feed_event_to_data, _feed_event_from_data),
    FeedLocation: (location_to_data, location_from_data),
}


# ---------------------------------------------------------------------- by field type


def integer(value: Any) -> int:
    """``value`` if it is an integer (a bool is not one); else ValueError: corrupt data."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected a boolean, got {value!r}")
    return value


def _identity(value: Any) -> Any:
    return value


@functools.cache
def _codec_of(hint: Any) -> tuple[Encode, Decode]:
    """Encode and decode for a field's type hint."""
    if hint in _COMPACT:
        return _COMPACT[hint]
    if hint is int:
        return _identity, integer
    if hint is str:
        return _identity, _str
    if hint is bool:
        return _identity, _bool
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in arguments:
        (inner,) = [a for a in arguments if a is not type(None)]
        encode, decode = _codec_of(inner)
        return (
            lambda v: None if v is None else encode(v),
            lambda d: None if d is None else decode(d),
        )
    if origin in (typing.Union, types.UnionType) and all(map(dataclasses.is_dataclass, arguments)):
        return tagged_codec(hint)
    if origin is tuple and len(arguments) == 2 and arguments[1] is Ellipsis:
        encode, decode = _codec_of(arguments[0])
        return (lambda v: [encode(x) for x in v], lambda d: tuple(decode(x) for x in d))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return (lambda v: v.value, hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        fields = dataclass_codec(hint)
        return fields.encode, fields.decode
    raise TypeError(f"no codec for field type {hint!r}")


class DataclassCodec(typing.Generic[T]):
    """A dataclass as an object of its fields (defaults left out), and back."""

    def __init__(self, cls: type[T]) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls)
        self._fields = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            encode, decode = _codec_of(hints[f.name])
            self._fields.append((f.name, encode, decode, default))

    def encode(self, value: T) -> Data:
        data: Data = {}
        for name, encode, _, default in self._fields:
            field_value = getattr(value, name)
            if default is dataclasses.MISSING or field_value != default:
                data[name] = encode(field_value)
        return data

    def decode(self, data: Data) -> T:
        values = {}
        for name, _, decode, default in self._fields:
            if name in data:
                values[name] = decode(data[name])
            elif default is dataclasses.MISSING:
                raise ValueError(f"{self.cls.__name__}: field {name!r} missing")
        return self.cls(**values)


_DATACLASS_CODECS: dict[type[Any], DataclassCodec[Any]] = {}


def dataclass_codec(cls: type[T]) -> DataclassCodec[T]:
    """The codec of a dataclass, built once per class."""
    codec = _DATACLASS_CODECS.get(cls)
    if codec is None:
        codec = _DATACLASS_CODECS[cls] = DataclassCodec(cls)
    return codec


def tagged_codec(union: Any) -> tuple[Callable[[Any], Data], Callable[[Data], Any]]:
    """A union of dataclasses as ``{"kind": <class name>, <fields>}``, and back."""
    by_name = {cls.__name__: cls for cls in typing.get_args(union)}

    def encode(value: Any) -> Data:
        return {"kind": type(value).__name__} | dataclass_codec(type(value)).encode(value)

    def decode(data: Data) -> Any:
        cls = by_name.get(data.get("kind", ""))
        if cls is None:
            raise ValueError(f"unknown kind {data.get('kind')!r}")
        return dataclass_codec(cls).decode({k: v for k, v in data.items() if k != "kind"})

    return encode, decode


# ------------------------------------------------------------------------- canonical bytes


def canonical_bytes(data: Any) -> bytes:
    """One byte form of plain data: equal data, equal bytes (dict keys sorted)."""
    parts: list[bytes] = []
    _canonical(data, parts.append)
    return b"".join(parts)


def _canonical(data: Any, put: Callable[[bytes], None]) -> None:
    # Exact types first, most frequent first (every reservation is fingerprinted); anything
    # else (a subclass) goes through the general match, so the bytes never depend on it.
    kind = type(data)
    if kind is str:
        encoded = data.encode()
        put(b"s%d:" % len(encoded))
        put(encoded)
    elif kind is int:
        put(b"i%d;" % data)
    elif kind is dict:
        put(b"d%d:" % len(data))
        for key in sorted(data):
            _canonical(_str(key), put)
            _canonical(data[key], put)
    elif kind is list or kind is tuple:
        put(b"l%d:" % len(data))
        for item in data:
            _canonical(item, put)
    else:
        _canonical_other(data, put)


def _canonical_other(data: Any, put: Callable[[bytes], None]) -> None:
    match data:
        case None:
            put(b"n")
        case bool():
            put(b"t" if data else b"f")
        case int():
            put(b"i%d;" % data)
        case str():
            encoded = data.encode()
            put(b"s%d:" % len(encoded))
            put(encoded)
        case list() | tuple():
            put(b"l%d:" % len(data))
            for item in data:
                _canonical(item, put)
        case dict():
            put(b"d%d:" % len(data))
            for key in sorted(data):
                _canonical(_str(key), put)
                _canonical(data[key], put)
        case _:
            raise TypeError(f"not plain data: {data!r}")


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
        integer(recorded_at_ms),
    )


# ------------------------------------------------------------------ the public encodings


def reservation_to_data(reservation: Reservation) -> Data:
    return dataclass_codec(Reservation).encode(reservation)


def reservation_from_data(data: Data) -> Reservation:
    reservation: Reservation = dataclass_codec(Reservation).decode(data)
    return reservation


_outcome_codec = tagged_codec(Accepted)


def outcome_to_data(outcome: Accepted) -> Data:
    """An accepted answer as ``{"kind": <class name>, <fields>}`` (idempotency entries)."""
    return _outcome_codec[0](outcome)


def outcome_from_data(data: Data) -> Accepted:
    outcome: Accepted = _outcome_codec[1](data)
    return outcome
