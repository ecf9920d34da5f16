"""The ledger's row format: one row per partition per flush (migration 0005).

A row holds a partition's records of one flush, lsns ``first_lsn..last_lsn``, in two blobs:

- ``records``: the commands, each as the core's plain data (``command_to_data``);
- ``changes``: per record, its key changes as the protobuf payloads that went to Redis, so
  the outbox relay sends exactly what the live path sent (DESIGN section 8).

Each blob starts with a format byte. ``MSGPACK`` is what this release writes: MessagePack
is binary, compact and decoded in C, so PostgreSQL parses nothing per reservation (a bytea
is stored as is) and the shard pays about a microsecond a record to encode it. ``JSON`` is
what migration 0005 converted the rows of earlier releases to (one record a row): a list of
command payloads and a list per record of compact change lists (``event_to_data``). A blob
in any other format, or one that does not decode to its row's lsns, is corruption.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from inventory_core import (
    AvailabilityChanged,
    Record,
    command_from_data,
    command_to_data,
    event_from_data,
)

from .readview import EncodedChange, encode_change, stored_change

MSGPACK = 1
JSON = 0


@dataclass(frozen=True, slots=True)
class Batch:
    """One partition's part of a flush, as a ledger row stores it."""

    partition: int
    first_lsn: int
    last_lsn: int
    recorded_at_ms: int
    records: bytes
    changes: bytes


def encode_batches(
    records: Sequence[Record], events: Sequence[AvailabilityChanged], payloads: Sequence[bytes]
) -> dict[int, Batch]:
    """Each partition's records (contiguous, in lsn order) and their changes (``events``,
    each encoded as its ``payloads`` entry) as one row."""
    commands: dict[int, list[Any]] = {}
    firsts: dict[int, int] = {}
    newest: dict[int, int] = {}
    for record in records:
        partition = record.partition
        if partition not in commands:
            commands[partition] = []
            firsts[partition] = record.lsn
            newest[partition] = record.recorded_at_ms
        commands[partition].append(command_to_data(record.command))
        newest[partition] = max(newest[partition], record.recorded_at_ms)
    changes: dict[int, list[list[bytes]]] = {p: [[] for _ in c] for p, c in commands.items()}
    for event, payload in zip(events, payloads, strict=True):
        changes[event.partition][event.lsn - firsts[event.partition]].append(payload)
    batches = {}
    for partition, data in commands.items():
        first = firsts[partition]
        batches[partition] = Batch(
            partition,
            first,
            first + len(data) - 1,
            newest[partition],
            _pack(data),
            _pack(changes[partition]),
        )
    return batches


def decode_records(partition: int, first_lsn: int, last_lsn: int, blob: bytes) -> list[Record]:
    """The records of a row, checked against the lsns the row says it holds."""
    data = _unpack(blob, partition, first_lsn)
    _check_count(data, partition, first_lsn, last_lsn)
    return [
        Record(partition, first_lsn + offset, command_from_data(command))
        for offset, command in enumerate(data)
    ]


def decode_changes(
    partition: int, first_lsn: int, last_lsn: int, blob: bytes
) -> list[tuple[int, list[EncodedChange]]]:
    """Each record's lsn and its changes, ready for the apply script. A change converted
    from an earlier release carries its record's time as committed_at (that release did not
    store the flush time)."""
    data = _unpack(blob, partition, first_lsn)
    _check_count(data, partition, first_lsn, last_lsn)
    stored: list[tuple[int, list[EncodedChange]]] = []
    for offset, record_changes in enumerate(data):
        lsn = first_lsn + offset
        if blob[0] == MSGPACK:
            encoded = [stored_change(payload, i) for i, payload in enumerate(record_changes)]
        else:
            events = [event_from_data(change, partition, lsn) for change in record_changes]
            encoded = [encode_change(e, i, e.recorded_at_ms) for i, e in enumerate(events)]
        if any(change.partition != partition or change.lsn != lsn for change in encoded):
            raise ValueError(f"ledger row {partition}/{first_lsn}: a change of another record")
        stored.append((lsn, encoded))
    return stored


def _pack(data: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return bytes((MSGPACK,)) + packed


def _unpack(blob: bytes, partition: int, first_lsn: int) -> list[Any]:
    if not blob:
        raise ValueError(f"ledger row {partition}/{first_lsn}: empty blob")
    body = memoryview(blob)[1:]
    if blob[0] == MSGPACK:
        data = msgpack.unpackb(body, raw=False)
    elif blob[0] == JSON:
        data = json.loads(bytes(body))
    else:
        raise ValueError(f"ledger row {partition}/{first_lsn}: unknown format {blob[0]}")
    if not isinstance(data, list):
        raise ValueError(f"ledger row {partition}/{first_lsn}: not a list of records")
    return data


def _check_count(data: list[Any], partition: int, first_lsn: int, last_lsn: int) -> None:
    if len(data) != last_lsn - first_lsn + 1:
        raise ValueError(
            f"ledger row {partition}/{first_lsn}..{last_lsn}: holds {len(data)} records"
        )
