"""The partition store: ownership, the epoch-checked ledger, checkpoints and recovery.

Ownership (DESIGN section 4). ``acquire`` bumps each partition's epoch and names the new
owner; every later write of the owner (ledger flush, checkpoint) checks, in its own
transaction, that the epoch is still the one it acquired. A deposed owner's write matches no
row, the transaction rolls back, and ``FencedOut`` names the partitions it lost.

Flush (DESIGN section 5). One transaction per batch, whatever partitions it spans:
  1. advance every partition's ``head_lsn`` from the head the owner last flushed to the new
     one, only where the epoch and the previous head match (this also locks the rows, so a
     concurrent takeover waits for the batch and then sees its head);
  2. insert the records with one multi-row ``INSERT ... SELECT FROM unnest``.
Any error other than ``FencedOut`` leaves the outcome unknown: the caller must fail-stop.

Checkpoints (DESIGN section 7): every table of a partition's state is rows of
``partition_rows`` (partition, table name, row key, body), encoded by the table's own schema
(``inventory_core.TABLES``), so this module has no code per table. Recovery: the last
checkpoint at the partition's ``checkpoint_lsn``, then the ledger tail replayed through the
core.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import asyncpg
import structlog

from inventory_core import (
    TABLES,
    AvailabilityChanged,
    CheckpointDelta,
    Partition,
    Record,
    command_from_data,
    command_to_data,
    event_to_data,
)

log = structlog.get_logger(__name__)

# A connection of its own or one lent by the pool.
Connection: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)


# Every statement that changes partition rows first locks them in partition order, so a
# takeover and a flush over overlapping partitions queue behind each other instead of
# deadlocking. MATERIALIZED keeps the locking query from being folded into the UPDATE.
LOCK_IN_ORDER = """WITH locked AS MATERIALIZED (
        SELECT partition FROM partitions WHERE partition = ANY($1::integer[])
         ORDER BY partition FOR UPDATE)"""


class FencedOut(Exception):
    """Another owner took these partitions: this process must stop serving them."""

    def __init__(self, partitions: Sequence[int]) -> None:
        super().__init__(f"fenced out of partitions {sorted(partitions)}")
        self.partitions = tuple(sorted(partitions))


@dataclass(frozen=True, slots=True)
class Owned:
    partition: int
    epoch: int


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """A record as stored, for verification and the outbox."""

    partition: int
    lsn: int
    epoch: int
    record: Record


class PartitionStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # ------------------------------------------------------------------------ ownership

    async def acquire(self, partitions: Sequence[int], owner: str) -> list[Owned]:
        """Take partitions: bump their epochs, fencing whoever held them."""
        rows = await self._pool.fetch(
            f"""{LOCK_IN_ORDER}
               UPDATE partitions AS p
                  SET epoch = epoch + 1, owner = $2, owned_since = now()
                 FROM locked WHERE p.partition = locked.partition
            RETURNING p.partition, p.epoch""",
            list(partitions),
            owner,
        )
        return sorted((Owned(r["partition"], r["epoch"]) for r in rows), key=lambda o: o.partition)

    async def epochs(self, partitions: Sequence[int]) -> dict[int, int]:
        rows = await self._pool.fetch(
            "SELECT partition, epoch FROM partitions WHERE partition = ANY($1::integer[])",
            list(partitions),
        )
        return {r["partition"]: r["epoch"] for r in rows}

    async def owners(self) -> dict[int, tuple[str | None, int]]:
        rows = await self._pool.fetch("SELECT partition, owner, epoch FROM partitions")
        return {r["partition"]: (r["owner"], r["epoch"]) for r in rows}

    # ------------------------------------------------------------------------ the ledger

    async def flush(
        self,
        records: Sequence[Record],
        epochs: Mapping[int, int],
        flushed_heads: Mapping[int, int],
        events: Sequence[AvailabilityChanged] = (),
    ) -> tuple[int, ...]:
        """Append one batch durably. Returns the partitions another owner took (their epoch
        or head no longer matches): then the transaction rolled back and NOTHING of the
        batch was written. Raises when the outcome is unknown.

        ``flushed_heads`` is each partition's head lsn before this batch; the batch must hold
        each partition's records contiguously after it. ``events`` are the key changes the
        records made; each record stores its own, so the ledger doubles as the outbox.
        """
        heads: dict[int, int] = {}
        for record in records:
            expected = heads.get(record.partition, flushed_heads[record.partition]) + 1
            if record.lsn != expected:
                raise AssertionError(f"record {record.partition}/{record.lsn}, expected {expected}")
            heads[record.partition] = record.lsn
        partitions = sorted(heads)  # a fixed lock order: no deadlock between owners
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                advanced = await connection.fetch(
                    f"""{LOCK_IN_ORDER}
                       UPDATE partitions AS p SET head_lsn = v.head
                         FROM locked,
                              unnest($1::integer[], $2::bigint[], $3::bigint[], $4::bigint[])
                              AS v(partition, epoch, previous, head)
                        WHERE p.partition = locked.partition AND p.partition = v.partition
                          AND p.epoch = v.epoch AND p.head_lsn = v.previous
                    RETURNING p.partition""",
                    partitions,
                    [epochs[p] for p in partitions],
                    [flushed_heads[p] for p in partitions],
                    [heads[p] for p in partitions],
                )
                if len(advanced) != len(partitions):
                    lost = set(partitions) - {r["partition"] for r in advanced}
                    raise FencedOut(sorted(lost))
                await connection.execute(
                    """INSERT INTO ledger (partition, lsn, epoch, recorded_at, occurred_at, kind,
                                           merchant_id, idempotency_key, payload, changes)
                       SELECT partition, lsn, epoch, to_timestamp(recorded_ms / 1000.0),
                              to_timestamp(occurred_ms / 1000.0), kind, merchant_id,
                              idempotency_key, payload::jsonb, changes::jsonb
                         FROM unnest($1::integer[], $2::bigint[], $3::bigint[], $4::bigint[],
                                     $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],
                                     $10::text[])
                              AS v(partition, lsn, epoch, recorded_ms, occurred_ms, kind,
                                   merchant_id, idempotency_key, payload, changes)""",
                    *_ledger_columns(records, epochs, events),
                )
        except FencedOut as fenced:  # raised inside the transaction: it rolled back
            return fenced.partitions
        return ()

    async def ledger(self, partition: int, after_lsn: int = 0) -> list[LedgerRow]:
        rows = await self._pool.fetch(
            """SELECT partition, lsn, epoch, payload::text AS payload FROM ledger
                WHERE partition = $1 AND lsn > $2 ORDER BY lsn""",
            partition,
            after_lsn,
        )
        return [_ledger_row(r) for r in rows]

    # ---------------------------------------------------------------------- checkpoints

    async def write_checkpoint(
        self, deltas: Sequence[CheckpointDelta], epochs: Mapping[int, int]
    ) -> None:
        """Upsert what changed since the previous checkpoint, epoch-checked, in one transaction."""
        if not deltas:
            return
        by_partition = {d.partition: d for d in deltas}
        partitions = sorted(by_partition)
        async with self._pool.acquire() as connection, connection.transaction():
            advanced = await connection.fetch(
                f"""{LOCK_IN_ORDER}
                   UPDATE partitions AS p SET checkpoint_lsn = v.lsn
                     FROM locked, unnest($1::integer[], $2::bigint[], $3::bigint[])
                          AS v(partition, epoch, lsn)
                    WHERE p.partition = locked.partition AND p.partition = v.partition
                      AND p.epoch = v.epoch
                RETURNING p.partition""",
                partitions,
                [epochs[p] for p in partitions],
                [by_partition[p].lsn for p in partitions],
            )
            if len(advanced) != len(partitions):
                raise FencedOut(sorted(set(partitions) - {r["partition"] for r in advanced}))
            full = [d.partition for d in deltas if d.full]
            if full:
                await connection.execute(
                    "DELETE FROM partition_rows WHERE partition = ANY($1::integer[])", full
                )
            await _upsert_rows(connection, deltas)
            await _delete_rows(connection, deltas)

    # ------------------------------------------------------------------------- recovery

    async def load(self, partitions: Sequence[int]) -> dict[int, Partition]:
        """Rebuild partitions from their last checkpoint and the ledger tail."""
        wanted = list(partitions)
        async with (
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            heads = {
                r["partition"]: (r["checkpoint_lsn"], r["head_lsn"])
                for r in await connection.fetch(
                    """SELECT partition, checkpoint_lsn, head_lsn FROM partitions
                        WHERE partition = ANY($1::integer[])""",
                    wanted,
                )
            }
            rows = await connection.fetch(
                """SELECT partition, table_name, row_key::text AS row_key, body::text AS body
                     FROM partition_rows WHERE partition = ANY($1::integer[])""",
                wanted,
            )
            tail = await connection.fetch(
                """SELECT l.partition, l.lsn, l.epoch, l.payload::text AS payload
                     FROM ledger l JOIN partitions p ON p.partition = l.partition
                    WHERE l.partition = ANY($1::integer[]) AND l.lsn > p.checkpoint_lsn
                    ORDER BY l.partition, l.lsn""",
                wanted,
            )
        tables_by: dict[int, dict[str, list[tuple[object, object]]]] = defaultdict(dict)
        for r in rows:
            schema = TABLES[r["table_name"]]
            row = (
                schema.key_from_data(json.loads(r["row_key"])),
                schema.row_from_data(json.loads(r["body"])),
            )
            tables_by[r["partition"]].setdefault(r["table_name"], []).append(row)
        tail_by = defaultdict(list)
        for r in tail:
            tail_by[r["partition"]].append(_ledger_row(r))
        loaded = {}
        for partition in wanted:
            checkpoint_lsn, head_lsn = heads[partition]
            restored = Partition.restore(partition, checkpoint_lsn, tables_by[partition])
            for stored in tail_by[partition]:
                restored.replay(stored.record)
            if restored.head_lsn != head_lsn:
                raise AssertionError(
                    f"partition {partition}: ledger ends at {restored.head_lsn}, head is {head_lsn}"
                )
            loaded[partition] = restored
        return loaded


# ------------------------------------------------------------------------------ helpers


def _ledger_columns(
    records: Sequence[Record],
    epochs: Mapping[int, int],
    events: Sequence[AvailabilityChanged],
) -> list[list[object]]:
    changes: dict[tuple[int, int], list[object]] = defaultdict(list)
    for event in events:
        changes[(event.partition, event.lsn)].append(event_to_data(event))
    columns: list[list[object]] = [[] for _ in range(10)]
    for record in records:
        command = record.command
        occurred = getattr(command, "occurred_at_ms", 0) or None
        values = (
            record.partition,
            record.lsn,
            epochs[record.partition],
            record.recorded_at_ms,
            occurred,
            record.kind,
            getattr(command, "merchant_id", None),
            getattr(command, "idempotency_key", None),
            json.dumps(command_to_data(command), separators=(",", ":")),
            json.dumps(changes.get((record.partition, record.lsn), []), separators=(",", ":")),
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


def _ledger_row(row: asyncpg.Record) -> LedgerRow:
    """Decode and check a stored record: it must name the partition and lsn it sits at."""
    command = command_from_data(json.loads(row["payload"]))
    record = Record(row["partition"], row["lsn"], command)
    return LedgerRow(row["partition"], row["lsn"], row["epoch"], record)


def _json(data: object) -> str:
    return json.dumps(data, separators=(",", ":"))


async def _upsert_rows(connection: Connection, deltas: Sequence[CheckpointDelta]) -> None:
    """Every table's upserts, by the table's schema, in one statement."""
    columns: list[list[object]] = [[], [], [], [], []]
    for delta in deltas:
        for name, changes in delta.tables.items():
            schema = TABLES[name]
            for key, row in changes.upserts:
                values = (
                    delta.partition,
                    name,
                    _json(schema.key_to_data(key)),
                    _json(schema.row_to_data(row)),
                    delta.lsn,
                )
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
    if columns[0]:
        await connection.execute(
            """INSERT INTO partition_rows (partition, table_name, row_key, body, checkpoint_lsn)
               SELECT partition, table_name, row_key::jsonb, body::jsonb, lsn
                 FROM unnest($1::integer[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                      AS v(partition, table_name, row_key, body, lsn)
               ON CONFLICT (partition, table_name, row_key) DO UPDATE
                  SET body = EXCLUDED.body, checkpoint_lsn = EXCLUDED.checkpoint_lsn""",
            *columns,
        )


async def _delete_rows(connection: Connection, deltas: Sequence[CheckpointDelta]) -> None:
    """Every table's removals (a key created and forgotten between checkpoints: a no-op)."""
    columns: list[list[object]] = [[], [], []]
    for delta in deltas:
        for name, changes in delta.tables.items():
            schema = TABLES[name]
            for key in changes.removals:
                for column, value in zip(
                    columns, (delta.partition, name, _json(schema.key_to_data(key))), strict=True
                ):
                    column.append(value)
    if columns[0]:
        await connection.execute(
            """DELETE FROM partition_rows AS r
                USING unnest($1::integer[], $2::text[], $3::text[])
                      AS v(partition, table_name, row_key)
                WHERE r.partition = v.partition AND r.table_name = v.table_name
                  AND r.row_key = v.row_key::jsonb""",
            *columns,
        )
