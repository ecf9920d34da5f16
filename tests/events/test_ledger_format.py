"""The ledger's row format (persistence/ledger.py), without a database.

Every record kind of the golden ledger (tests/core/golden/v1) survives a round trip through
one row; the changes it stores are sent again byte for byte as the live path sent them; a
row converted from an earlier release (JSON, migration 0005) decodes to the same records and
changes; and a blob that does not match its row is refused as corruption.
"""

from __future__ import annotations

import json

import pytest

from inventory_core import AvailabilityChanged, Partition, Record, event_to_data
from persistence.ledger import JSON, MSGPACK, decode_changes, decode_records, encode_batches
from persistence.readview import change_payload, encode_change
from tests.core.test_golden import ledger, records

COMMITTED_AT_MS = 1_700_000_999_000


def golden_flush() -> tuple[list[Record], list[AvailabilityChanged]]:
    """The golden records replayed from empty: the records and the changes they made."""
    stored = records()
    partition = Partition(stored[0].partition)
    events = [event for record in stored for event in partition.replay(record)]
    return stored, events


def test_every_record_kind_survives_one_row_and_its_changes_are_sent_byte_for_byte() -> None:
    stored, events = golden_flush()
    payloads = [change_payload(e, COMMITTED_AT_MS) for e in events]
    (batch,) = encode_batches(stored, events, payloads).values()
    assert (batch.first_lsn, batch.last_lsn) == (stored[0].lsn, stored[-1].lsn)
    assert batch.records[0] == batch.changes[0] == MSGPACK
    assert batch.recorded_at_ms == max(r.recorded_at_ms for r in stored)
    assert len({r.kind for r in stored}) > 5, "the golden ledger holds many kinds"

    assert decode_records(batch.partition, batch.first_lsn, batch.last_lsn, batch.records) == stored

    live = [encode_change(e, i, COMMITTED_AT_MS, p) for e, i, p in _numbered(events, payloads)]
    again = decode_changes(batch.partition, batch.first_lsn, batch.last_lsn, batch.changes)
    assert [lsn for lsn, _ in again] == [r.lsn for r in stored]
    assert [change for _, changes in again for change in changes] == live


def test_a_row_converted_from_an_earlier_release_decodes_to_the_same_records() -> None:
    old = ledger()[0]  # as migration 0005 converts one row of the old table
    records_blob = bytes([JSON]) + json.dumps([old["payload"]]).encode()
    changes_blob = bytes([JSON]) + json.dumps([old["changes"]]).encode()
    lsn = old["lsn"]

    (record,) = decode_records(old["partition"], lsn, lsn, records_blob)
    assert record == records()[0]
    ((at, changes),) = decode_changes(old["partition"], lsn, lsn, changes_blob)
    assert at == lsn and len(changes) == len(old["changes"]) > 0
    _, events = golden_flush()
    first = [e for e in events if e.lsn == lsn]
    assert [event_to_data(e) for e in first] == old["changes"]
    # That release did not store the flush time: the record's time stands in for it.
    assert changes == [encode_change(e, i, e.recorded_at_ms) for i, e in enumerate(first)]


@pytest.mark.parametrize(
    ("blob", "error"),
    [
        (b"", "empty"),
        (bytes([7]) + b"[]", "unknown format 7"),
        (bytes([JSON]) + b'{"a": 1}', "not a list"),
        (bytes([JSON]) + b"[]", "holds 0 records"),
    ],
)
def test_a_blob_that_does_not_match_its_row_is_corruption(blob: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        decode_records(3, 1, 1, blob)


def test_a_stored_change_of_another_record_is_corruption() -> None:
    stored, events = golden_flush()
    payloads = [change_payload(e, COMMITTED_AT_MS) for e in events]
    (batch,) = encode_batches(stored, events, payloads).values()
    with pytest.raises(ValueError, match="a change of another record"):
        decode_changes(batch.partition, batch.first_lsn + 1, batch.last_lsn + 1, batch.changes)


def _numbered(
    events: list[AvailabilityChanged], payloads: list[bytes]
) -> list[tuple[AvailabilityChanged, int, bytes]]:
    numbered: list[tuple[AvailabilityChanged, int, bytes]] = []
    record: tuple[int, int] | None = None
    index = 0
    for event, payload in zip(events, payloads, strict=True):
        at = (event.partition, event.lsn)
        index = index + 1 if at == record else 0
        record = at
        numbered.append((event, index, payload))
    return numbered
