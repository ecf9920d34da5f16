"""The ledger codec: to_data then from_data (through JSON) is the identity.

Every command kind and every accepted outcome, plus keys, rows, reservations and events.
"""

from __future__ import annotations

import enum
import json
from typing import Any, get_args

import hypothesis.strategies as st
from hypothesis import given, settings

from inventory_core import (
    Accepted,
    AckStatus,
    AdjustmentReason,
    AdjustStock,
    AvailabilityChanged,
    ChangeReason,
    Command,
    Commit,
    Committed,
    Consumed,
    DeliveryExpected,
    EventAck,
    ExpectDelivery,
    Expire,
    Expired,
    Extend,
    Extended,
    FeedEvent,
    FeedEventKind,
    FeedLocation,
    Ingest,
    Ingested,
    InventoryKey,
    KeySplit,
    Line,
    MarkedStale,
    MarkStale,
    MergeKey,
    OverCommit,
    OverCommitted,
    QuotaReceived,
    QuotaSent,
    ReceiveQuota,
    Release,
    Released,
    Reservation,
    ReservationState,
    Reserve,
    Reserved,
    SendQuota,
    SetSafetyStock,
    SetStock,
    SettleTransfer,
    SplitKey,
    StockChanged,
    StockLevel,
    StockRow,
    Transfer,
    TransferSettled,
    canonical_bytes,
    command_from_data,
    command_to_data,
    event_from_data,
    event_to_data,
    key_from_data,
    key_to_data,
    kind_of,
    outcome_from_data,
    outcome_to_data,
    reservation_from_data,
    reservation_to_data,
    row_from_data,
    row_to_data,
)
from inventory_core._registry import BY_TYPE as COMMAND_KINDS

CODEC = settings(max_examples=200, deadline=None, print_blob=True)

identifiers = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-",
    min_size=1,
    max_size=64,
)
# The codec must carry any string, not only valid identifiers.
strings = st.one_of(identifiers, st.text(max_size=20))
ints = st.integers(-(2**53), 2**53)
naturals = st.integers(0, 2**53)
keys = st.builds(InventoryKey, strings, strings, strings)
lines = st.lists(st.builds(Line, keys, naturals), max_size=4).map(tuple)
# A row is live (no buffer) or stale since a time, with a buffer held back; with or
# without units incoming; a hot key's home allots units to its buckets.
rows = st.builds(StockRow, ints, naturals, naturals, naturals) | st.builds(
    StockRow,
    ints,
    naturals,
    naturals,
    naturals,
    naturals,
    st.integers(1, 2**53),
    naturals,
    naturals,
    naturals,
)
locations = st.builds(FeedLocation, strings, strings)
versions = st.none() | naturals
transfers = st.builds(
    Transfer,
    strings,
    keys,
    keys,
    naturals,
    naturals,
    st.lists(st.builds(Consumed, naturals, naturals), max_size=3).map(tuple),
)

COMMAND_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Reserve: st.builds(Reserve, strings, strings, lines, naturals, naturals, st.booleans()),
    Commit: st.builds(Commit, strings, strings, strings, lines, naturals),
    Release: st.builds(Release, strings, strings, strings, naturals),
    Extend: st.builds(Extend, strings, strings, strings, naturals, naturals),
    AdjustStock: st.builds(
        AdjustStock, keys, strings, ints, st.sampled_from(AdjustmentReason), naturals, naturals
    ),
    SetStock: st.builds(SetStock, keys, strings, naturals, versions, naturals),
    SetSafetyStock: st.builds(SetSafetyStock, keys, strings, naturals, versions, naturals),
    Expire: st.builds(Expire, st.lists(strings, max_size=5).map(tuple), naturals),
    Ingest: st.builds(
        Ingest,
        strings,
        strings,
        st.lists(
            st.builds(
                FeedEvent,
                strings,
                st.none() | st.sampled_from(FeedEventKind),
                keys,
                ints,
                ints,
                st.none() | naturals,
                strings,
                strings,
            ),
            max_size=4,
        ).map(tuple),
        naturals,
        strings,
        st.lists(strings, max_size=3).map(tuple),
    ),
    ExpectDelivery: st.builds(
        ExpectDelivery, strings, strings, strings, strings, lines, naturals, naturals
    ),
    MarkStale: st.builds(
        MarkStale, st.lists(locations, max_size=3).map(tuple), naturals, st.integers(1, 2**40)
    ),
    SplitKey: st.builds(
        SplitKey, keys, strings, st.lists(naturals, max_size=4).map(tuple), naturals
    ),
    MergeKey: st.builds(MergeKey, keys, strings, naturals),
    SendQuota: st.builds(SendQuota, keys, strings, keys, naturals, naturals),
    ReceiveQuota: st.builds(ReceiveQuota, transfers, naturals),
    SettleTransfer: st.builds(SettleTransfer, keys, strings, naturals),
}
commands: st.SearchStrategy[Command] = st.one_of(*COMMAND_STRATEGIES.values())

reservations = st.builds(
    Reservation,
    reservation_id=strings,
    merchant_id=strings,
    location_id=strings,
    lines=lines,
    state=st.sampled_from(ReservationState),
    created_at_ms=naturals,
    expires_at_ms=naturals,
    state_changed_at_ms=naturals,
    committed_lines=lines,
    created_lsn=naturals,
    finished_lsn=naturals,
)


@st.composite
def levels(draw: st.DrawFn) -> StockLevel:
    key = draw(keys)
    row = draw(st.none() | rows)
    return StockLevel.of(key, row)


level_tuples = st.lists(levels(), max_size=3).map(tuple)
over_commits = st.none() | st.builds(
    OverCommit, st.integers(1, 2**40), st.lists(strings, max_size=3).map(tuple)
)
OUTCOME_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Reserved: st.builds(Reserved, reservations, level_tuples),
    Committed: st.builds(Committed, reservations, level_tuples),
    Released: st.builds(Released, reservations, level_tuples),
    Extended: st.builds(Extended, reservations),
    StockChanged: st.builds(StockChanged, levels(), over_commits, st.booleans()),
    Expired: st.builds(Expired, st.lists(strings, max_size=5).map(tuple)),
    Ingested: st.builds(
        Ingested,
        st.lists(st.builds(EventAck, st.sampled_from(AckStatus), strings, strings)).map(tuple),
        st.lists(
            st.builds(OverCommitted, keys, over_commits.filter(lambda o: o is not None)),
            max_size=3,
        ).map(tuple),
        st.lists(strings, max_size=3).map(tuple),
    ),
    MarkedStale: st.builds(MarkedStale, st.lists(locations, max_size=3).map(tuple)),
    DeliveryExpected: st.builds(DeliveryExpected, level_tuples),
    KeySplit: st.builds(
        KeySplit, levels(), st.lists(keys, max_size=3).map(tuple), naturals, st.booleans()
    ),
    QuotaSent: st.builds(QuotaSent, transfers, levels()),
    QuotaReceived: st.builds(QuotaReceived, strings, levels(), st.booleans()),
    TransferSettled: st.builds(TransferSettled, strings, st.booleans()),
}
outcomes = st.one_of(*OUTCOME_STRATEGIES.values())
events = st.builds(
    AvailabilityChanged,
    keys,
    st.integers(0, 1023),
    naturals,
    st.sampled_from(ChangeReason),
    rows,
    rows,
    naturals,
)


def through_json(data: Any) -> Any:
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return json.loads(text)


@CODEC
@given(commands)
def test_every_command_round_trips(command: Command) -> None:
    data = command_to_data(command)
    assert data["kind"] == kind_of(command)
    assert command_from_data(through_json(data)) == command
    assert command_from_data(data) == command


def test_the_strategies_cover_every_command_kind_and_every_accepted_outcome() -> None:
    assert set(COMMAND_STRATEGIES) == set(COMMAND_KINDS)
    assert set(OUTCOME_STRATEGIES) == set(get_args(Accepted))


@CODEC
@given(outcomes)
def test_every_accepted_outcome_round_trips(outcome: Any) -> None:
    assert outcome_from_data(through_json(outcome_to_data(outcome))) == outcome


@CODEC
@given(reservations)
def test_reservation_round_trips(reservation: Reservation) -> None:
    assert reservation_from_data(through_json(reservation_to_data(reservation))) == reservation


@CODEC
@given(keys, rows)
def test_key_and_row_round_trip(key: InventoryKey, row: StockRow) -> None:
    assert key_from_data(through_json(key_to_data(key))) == key
    assert row_from_data(through_json(row_to_data(row))) == row


@CODEC
@given(events)
def test_event_round_trips(event: AvailabilityChanged) -> None:
    data = through_json(event_to_data(event))
    assert event_from_data(data, event.partition, event.lsn) == event


def test_unknown_kinds_are_refused() -> None:
    for decode in (command_from_data, outcome_from_data):
        try:
            decode({"kind": "nope", "now_ms": 0})
        except ValueError:
            continue
        raise AssertionError(f"{decode.__name__} accepted an unknown kind")


def _canonical_spec(data: object) -> bytes:
    """canonical_bytes as specified, written plainly (the core's is tuned for speed)."""
    match data:
        case None:
            return b"n"
        case bool():
            return b"t" if data else b"f"
        case int():
            return b"i%d;" % data
        case str():
            encoded = data.encode()
            return b"s%d:" % len(encoded) + encoded
        case list() | tuple():
            return b"l%d:" % len(data) + b"".join(_canonical_spec(item) for item in data)
        case dict():
            items = sorted(data.items())
            return b"d%d:" % len(data) + b"".join(
                _canonical_spec(key) + _canonical_spec(value) for key, value in items
            )
    raise TypeError(data)


class _Level(enum.IntEnum):
    LOW = 1


class _Reason(enum.StrEnum):
    SALE = "sale"


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.just(_Level.LOW)
    | st.just(_Reason.SALE),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(data=_plain)
def test_canonical_bytes_are_the_specified_bytes(data: object) -> None:
    assert canonical_bytes(data) == _canonical_spec(data)
