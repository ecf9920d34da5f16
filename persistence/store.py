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

Recovery: the last checkpoint (``stock``, ``reservations``, ``idempotency`` at the
partition's ``checkpoint_lsn``), then the ledger tail replayed through the core.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import asyncpg
import structlog

from inventory_core import (
    AvailabilityChanged,
    CheckpointDelta,
    IdempotencyEntry,
    InventoryKey,
    Partition,
    Record,
    command_from_data,
    command_to_data,
    event_to_data,
    outcome_from_data,
    outcome_to_data,
    reservation_from_data,
    reservation_to_data,
    row_from_data,
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
    ) -> None:
        """Append one batch durably, or raise (``FencedOut``, or unknown outcome).

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
                for table in ("stock", "reservations", "idempotency"):
                    await connection.execute(
                        f"DELETE FROM {table} WHERE partition = ANY($1::integer[])", full
                    )
            await _upsert_stock(connection, deltas)
            await _upsert_reservations(connection, deltas)
            await _upsert_idempotency(connection, deltas)

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
            stock = await connection.fetch(
                """SELECT partition, merchant_id, sku_id, location_id, on_hand, reserved,
                          safety_stock, version
                     FROM stock WHERE partition = ANY($1::integer[])""",
                wanted,
            )
            reservations = await connection.fetch(
                """SELECT partition, body::text AS body FROM reservations
                    WHERE partition = ANY($1::integer[])""",
                wanted,
            )
            idempotency = await connection.fetch(
                """SELECT partition, merchant_id, idempotency_key, body::text AS body
                     FROM idempotency WHERE partition = ANY($1::integer[])""",
                wanted,
            )
            tail = await connection.fetch(
                """SELECT l.partition, l.lsn, l.epoch, l.payload::text AS payload
                     FROM ledger l JOIN partitions p ON p.partition = l.partition
                    WHERE l.partition = ANY($1::integer[]) AND l.lsn > p.checkpoint_lsn
                    ORDER BY l.partition, l.lsn""",
                wanted,
            )
        rows_by = defaultdict(list)
        for r in stock:
            key = InventoryKey(r["merchant_id"], r["sku_id"], r["location_id"])
            row = row_from_data([r["on_hand"], r["reserved"], r["safety_stock"], r["version"]])
            rows_by[r["partition"]].append((key, row))
        reservations_by = defaultdict(list)
        for r in reservations:
            reservations_by[r["partition"]].append(reservation_from_data(json.loads(r["body"])))
        idempotency_by = defaultdict(list)
        for r in idempotency:
            idempotency_by[r["partition"]].append(_idempotency_entry(r))
        tail_by = defaultdict(list)
        for r in tail:
            tail_by[r["partition"]].append(_ledger_row(r))
        loaded = {}
        for partition in wanted:
            checkpoint_lsn, head_lsn = heads[partition]
            restored = Partition.restore(
                partition,
                checkpoint_lsn,
                rows_by[partition],
                reservations_by[partition],
                idempotency_by[partition],
            )
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


def _idempotency_entry(row: asyncpg.Record) -> IdempotencyEntry:
    body = json.loads(row["body"])
    return IdempotencyEntry(
        merchant_id=row["merchant_id"],
        idempotency_key=row["idempotency_key"],
        kind=body["kind"],
        fingerprint=body["fingerprint"],
        outcome=outcome_from_data(body["outcome"]),
        lsn=int(body["lsn"]),
        recorded_at_ms=int(body["recorded_at_ms"]),
    )


def _idempotency_body(entry: IdempotencyEntry) -> str:
    return json.dumps(
        {
            "kind": entry.kind,
            "fingerprint": entry.fingerprint,
            "outcome": outcome_to_data(entry.outcome),
            "lsn": entry.lsn,
            "recorded_at_ms": entry.recorded_at_ms,
        },
        separators=(",", ":"),
    )


async def _upsert_stock(connection: Connection, deltas: Iterable[CheckpointDelta]) -> None:
    rows = [
        (
            k.merchant_id,
            k.location_id,
            k.sku_id,
            d.partition,
            r.on_hand,
            r.reserved,
            r.safety_stock,
            r.version,
            d.lsn,
        )
        for d in deltas
        for k, r in d.stock
    ]
    if not rows:
        return
    await connection.execute(
        """INSERT INTO stock (merchant_id, location_id, sku_id, partition, on_hand, reserved,
                              safety_stock, version, checkpoint_lsn)
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::bigint[],
                                $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])
           ON CONFLICT (merchant_id, location_id, sku_id) DO UPDATE
              SET on_hand = EXCLUDED.on_hand, reserved = EXCLUDED.reserved,
                  safety_stock = EXCLUDED.safety_stock, version = EXCLUDED.version,
                  checkpoint_lsn = EXCLUDED.checkpoint_lsn""",
        *[list(column) for column in zip(*rows, strict=True)],
    )


async def _upsert_reservations(connection: Connection, deltas: Sequence[CheckpointDelta]) -> None:
    rows = [
        (
            r.reservation_id,
            d.partition,
            r.merchant_id,
            r.location_id,
            r.state.value,
            r.expires_at_ms,
            r.state_changed_at_ms,
            json.dumps(reservation_to_data(r), separators=(",", ":")),
        )
        for d in deltas
        for r in d.reservations
    ]
    if rows:
        await connection.execute(
            """INSERT INTO reservations (reservation_id, partition, merchant_id, location_id,
                                         state, expires_at, state_changed_at, body)
               SELECT id, partition, merchant_id, location_id, state,
                      to_timestamp(expires_ms / 1000.0), to_timestamp(changed_ms / 1000.0),
                      body::jsonb
                 FROM unnest($1::text[], $2::integer[], $3::text[], $4::text[], $5::text[],
                             $6::bigint[], $7::bigint[], $8::text[])
                      AS v(id, partition, merchant_id, location_id, state, expires_ms,
                           changed_ms, body)
               ON CONFLICT (reservation_id) DO UPDATE
                  SET state = EXCLUDED.state, expires_at = EXCLUDED.expires_at,
                      state_changed_at = EXCLUDED.state_changed_at, body = EXCLUDED.body""",
            *[list(column) for column in zip(*rows, strict=True)],
        )
    removed = [rid for d in deltas for rid in d.reservations_removed]
    if removed:
        await connection.execute(
            "DELETE FROM reservations WHERE reservation_id = ANY($1::text[])", removed
        )


async def _upsert_idempotency(connection: Connection, deltas: Sequence[CheckpointDelta]) -> None:
    rows = [
        (d.partition, e.merchant_id, e.idempotency_key, e.recorded_at_ms, _idempotency_body(e))
        for d in deltas
        for e in d.idempotency
    ]
    if rows:
        await connection.execute(
            """INSERT INTO idempotency (partition, merchant_id, idempotency_key,
                                        recorded_at_ms, body)
               SELECT partition, merchant_id, key, recorded_ms, body::jsonb
                 FROM unnest($1::integer[], $2::text[], $3::text[], $4::bigint[], $5::text[])
                      AS v(partition, merchant_id, key, recorded_ms, body)
               ON CONFLICT (partition, merchant_id, idempotency_key) DO UPDATE
                  SET recorded_at_ms = EXCLUDED.recorded_at_ms, body = EXCLUDED.body""",
            *[list(column) for column in zip(*rows, strict=True)],
        )
    forgotten = [(d.partition, m, k) for d in deltas for m, k in d.idempotency_removed]
    if forgotten:
        await connection.execute(
            """DELETE FROM idempotency AS i
                USING unnest($1::integer[], $2::text[], $3::text[])
                      AS v(partition, merchant_id, key)
                WHERE i.partition = v.partition AND i.merchant_id = v.merchant_id
                  AND i.idempotency_key = v.key""",
            *[list(column) for column in zip(*forgotten, strict=True)],
        )
