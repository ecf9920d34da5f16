"""The partition store: ownership, the epoch-checked ledger, checkpoints and recovery.

Ownership (DESIGN section 4). ``acquire`` bumps each partition's epoch and names the new
owner; every later write of the owner (ledger flush, checkpoint) checks, in its own
transaction, that the epoch is still the one it acquired. A deposed owner's write matches no
row, the transaction rolls back, and ``FencedOut`` names the partitions it lost.

Flush (DESIGN section 5). One statement per batch (one transaction, one round trip),
whatever partitions it spans: it advances every partition's ``head_lsn`` from the head the
owner last flushed to the new one and appends one ledger row per partition (its records and
their changes as two binary blobs, ``persistence/ledger.py``), only if every partition's
epoch and previous head still match; otherwise it
changes nothing and names the partitions another owner took. Locking the rows also makes a
concurrent takeover wait for the batch and then see its head. Any error leaves the outcome
unknown: the caller must fail-stop.

Checkpoints (DESIGN section 7): every table of a partition's state is rows of
``partition_rows`` (partition, table name, row key, version lsn, body), encoded by the
table's own schema (``inventory_core.TABLES``), so this module has no code per table. Rows
are written as new versions in bounded transactions and become visible together when the
partition's ``checkpoint_lsn`` moves (``write_checkpoint``; migration 0004). Recovery: the
newest visible version of each row, then the ledger tail replayed through the core.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import asyncpg
import orjson
import structlog

from inventory_core import TABLES, AvailabilityChanged, CheckpointDelta, Partition, Record

from .ledger import decode_records, encode_batches
from .readview import change_payload

log = structlog.get_logger(__name__)

# A connection of its own or one lent by the pool.
Connection: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)


# Every statement that changes partition rows first locks them in partition order, so a
# takeover and a flush over overlapping partitions queue behind each other instead of
# deadlocking. MATERIALIZED keeps the locking query from being folded into the UPDATE.
# The flush and the checkpoint's commit take FOR NO KEY UPDATE; a takeover takes FOR UPDATE,
# the one lock that also waits for a checkpoint's row writes (FOR KEY SHARE, _EPOCH_HELD).
_LOCK_ROWS = """WITH locked AS MATERIALIZED (
        SELECT partition FROM partitions WHERE partition = ANY($1::integer[])
         ORDER BY partition FOR {})"""
LOCK_IN_ORDER = _LOCK_ROWS.format("NO KEY UPDATE")
TAKE_IN_ORDER = _LOCK_ROWS.format("UPDATE")

# The partitions ($1) whose epoch is still the writer's ($2), held against a takeover for
# the rest of the statement: the checkpoint's row writes and deletions run only if all are.
_EPOCH_HELD = """WITH held AS MATERIALIZED (
        SELECT p.partition FROM partitions p
          JOIN unnest($1::integer[], $2::bigint[]) AS e(partition, epoch)
            ON p.partition = e.partition AND p.epoch = e.epoch
         ORDER BY p.partition FOR KEY SHARE OF p)"""


# The flush, one statement (its own transaction, one round trip): lock the batch's partition
# rows in partition order (no deadlock between owners; a takeover waits for the batch and
# then sees its head) where the epoch and the previous head still match; if all match,
# advance every head and append one ledger row per partition; if any does not, change
# nothing. It returns the partitions that matched.
_FLUSH = """WITH expected AS (
        SELECT * FROM unnest($1::integer[], $2::bigint[], $3::bigint[], $4::bigint[],
                             $5::bigint[], $6::bytea[], $7::bytea[])
            AS v(partition, epoch, previous, head, recorded_ms, records, changes)),
    matched AS MATERIALIZED (
        SELECT p.partition FROM partitions p JOIN expected v ON v.partition = p.partition
         WHERE p.epoch = v.epoch AND p.head_lsn = v.previous
         ORDER BY p.partition FOR NO KEY UPDATE OF p),
    complete AS MATERIALIZED (
        SELECT count(*) = cardinality($1::integer[]) AS ok FROM matched),
    advanced AS (
        -- the ANY() gives the planner an index condition: without it, it scans all 1,024
        -- rows (a seventh of PostgreSQL's CPU per flush of a few partitions)
        UPDATE partitions AS p SET head_lsn = v.head FROM expected v, complete
         WHERE complete.ok AND p.partition = v.partition
           AND p.partition = ANY($1::integer[])),
    appended AS (
        INSERT INTO ledger_batches (partition, last_lsn, first_lsn, epoch, recorded_at,
                                    records, changes)
        SELECT v.partition, v.head, v.previous + 1, v.epoch,
               to_timestamp(v.recorded_ms / 1000.0), v.records, v.changes
          FROM expected v, complete
         WHERE complete.ok)
SELECT partition FROM matched"""


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
            f"""{TAKE_IN_ORDER}
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
        payloads: Sequence[bytes] = (),
    ) -> tuple[int, ...]:
        """Append one batch durably. Returns the partitions another owner took (their epoch
        or head no longer matches): then the transaction rolled back and NOTHING of the
        batch was written. Raises when the outcome is unknown.

        ``flushed_heads`` is each partition's head lsn before this batch; the batch must hold
        each partition's records contiguously after it. ``events`` are the key changes the
        records made and ``payloads`` their encodings (``encode_changes``), as they go to
        Redis: the ledger keeps them, for it is the outbox.
        """
        heads: dict[int, int] = {}
        for record in records:
            expected = heads.get(record.partition, flushed_heads[record.partition]) + 1
            if record.lsn != expected:
                raise AssertionError(f"record {record.partition}/{record.lsn}, expected {expected}")
            heads[record.partition] = record.lsn
        batches = encode_batches(records, events, payloads)
        partitions = sorted(heads)
        rows = [batches[p] for p in partitions]
        matched = await self._pool.fetch(
            _FLUSH,
            partitions,
            [epochs[p] for p in partitions],
            [flushed_heads[p] for p in partitions],
            [heads[p] for p in partitions],
            [row.recorded_at_ms for row in rows],
            [row.records for row in rows],
            [row.changes for row in rows],
        )
        if len(matched) == len(partitions):
            return ()
        return tuple(sorted(set(partitions) - {r["partition"] for r in matched}))

    def encode_changes(
        self, events: Sequence[AvailabilityChanged], committed_at_ms: int
    ) -> list[bytes]:
        """Each change as the ledger's outbox stores it and Redis receives it: the owner
        encodes a batch's changes once, for its flush and for the publisher."""
        return [change_payload(event, committed_at_ms) for event in events]

    async def ledger(self, partition: int, after_lsn: int = 0) -> list[LedgerRow]:
        """The partition's records after ``after_lsn``, in order, as stored."""
        rows = await self._pool.fetch(
            """SELECT partition, first_lsn, last_lsn, epoch, records FROM ledger_batches
                WHERE partition = $1 AND last_lsn > $2 ORDER BY last_lsn""",
            partition,
            after_lsn,
        )
        return [stored for r in rows for stored in _ledger_rows(r) if stored.lsn > after_lsn]

    # ---------------------------------------------------------------------- checkpoints

    async def write_checkpoint(
        self,
        deltas: Sequence[CheckpointDelta],
        epochs: Mapping[int, int],
        rows_per_transaction: int,
    ) -> None:
        """Write a checkpoint of several partitions without ever stalling their flushes.

        1. The rows, in transactions of at most ``rows_per_transaction`` rows, each row a
           new version at its delta's lsn (a removed row: a NULL body). They stay invisible:
           recovery reads versions up to the partition's ``checkpoint_lsn`` only. Each
           statement checks the epoch under FOR KEY SHARE, which a flush's lock does not
           conflict with and a takeover's does: once a takeover holds the row, no row of
           the deposed owner's can land.
        2. One short transaction moves every partition's ``checkpoint_lsn`` (and, for a
           full delta, ``checkpoint_base_lsn``: every older version is hidden at once).
        3. The versions this checkpoint superseded are deleted, in bounded statements.
        Raises FencedOut if another owner took a partition (nothing became visible).
        A failure in step 1 or 2 leaves the previous checkpoint in force; one in step 3
        leaves superseded versions behind, which are invisible and deleted later.
        """
        if not deltas:
            return
        pieces = [piece for d in deltas for piece in d.pieces(rows_per_transaction)]
        groups = [g for g in _groups(pieces, rows_per_transaction) if any(p.row_count for p in g)]
        superseded = []
        for group in groups:
            # Encoding costs tens of µs a row (an answer is a nested dataclass): off the
            # loop, with the prune's key columns, so that replies keep flowing while a large
            # checkpoint is written (the GIL hands the loop back every few ms). The rows are
            # immutable values taken at the checkpoint.
            rows, keys = await asyncio.to_thread(_encode_rows, group)
            partitions = sorted({piece.partition for piece in group})
            await self._write_rows(partitions, rows, epochs)
            superseded.append((partitions, keys))
        await self._commit_checkpoint(deltas, epochs)
        for partitions, keys in superseded:
            await self._prune_superseded(partitions, keys, epochs)
        for delta in deltas:
            if delta.full:
                await self._prune_below_base(delta.partition, rows_per_transaction)

    async def _write_rows(
        self, partitions: Sequence[int], columns: list[list[object]], epochs: Mapping[int, int]
    ) -> None:
        async with self._pool.acquire() as connection, connection.transaction():
            # The rows are invisible until step 2, whose commit waits for WAL up to itself
            # (this transaction's included): no fsync of their own is needed.
            await connection.execute("SET LOCAL synchronous_commit = off")
            kept = await connection.fetchval(
                f"""{_EPOCH_HELD}
                   , written AS (
                       INSERT INTO partition_rows
                              (partition, table_name, row_key, body, checkpoint_lsn)
                       SELECT v.partition, v.table_name, v.row_key::jsonb, v.body::jsonb, v.lsn
                         FROM unnest($3::integer[], $4::text[], $5::text[], $6::text[],
                                     $7::bigint[]) AS v(partition, table_name, row_key, body, lsn)
                        WHERE (SELECT count(*) FROM held) = cardinality($1::integer[])
                       ON CONFLICT (partition, table_name, row_key, checkpoint_lsn)
                       DO UPDATE SET body = EXCLUDED.body)
                   SELECT count(*) FROM held""",
                partitions,
                [epochs[p] for p in partitions],
                *columns,
            )
            if kept != len(partitions):
                raise FencedOut(await self._lost(partitions, epochs))

    async def _commit_checkpoint(
        self, deltas: Sequence[CheckpointDelta], epochs: Mapping[int, int]
    ) -> None:
        by_partition = {d.partition: d for d in deltas}
        partitions = sorted(by_partition)
        advanced = await self._pool.fetch(
            f"""{LOCK_IN_ORDER}
               UPDATE partitions AS p
                  SET checkpoint_lsn = v.lsn,
                      checkpoint_base_lsn = CASE WHEN v.is_full THEN v.lsn
                                                 ELSE p.checkpoint_base_lsn END
                 FROM locked, unnest($2::bigint[], $3::bigint[], $4::boolean[], $1::integer[])
                      AS v(epoch, lsn, is_full, partition)
                WHERE p.partition = locked.partition AND p.partition = v.partition
                  AND p.epoch = v.epoch AND v.lsn >= p.checkpoint_lsn
            RETURNING p.partition""",
            partitions,
            [epochs[p] for p in partitions],
            [by_partition[p].lsn for p in partitions],
            [by_partition[p].full for p in partitions],
        )
        if len(advanced) != len(partitions):
            raise FencedOut(sorted(set(partitions) - {r["partition"] for r in advanced}))

    async def _prune_superseded(
        self, partitions: Sequence[int], columns: list[list[object]], epochs: Mapping[int, int]
    ) -> None:
        """Delete the older versions of the rows a group wrote (``columns``: partition,
        table, key, lsn), and their removals (a removed row with no older version left is
        nothing at all)."""
        if not columns or not columns[0]:
            return
        await self._pool.execute(
            f"""{_EPOCH_HELD}
               DELETE FROM partition_rows AS r
                USING unnest($3::integer[], $4::text[], $5::text[], $6::bigint[])
                      AS v(partition, table_name, row_key, lsn)
                WHERE (SELECT count(*) FROM held) = cardinality($1::integer[])
                  AND r.partition = v.partition AND r.table_name = v.table_name
                  AND r.row_key = v.row_key::jsonb
                  AND (r.checkpoint_lsn < v.lsn
                       OR (r.checkpoint_lsn = v.lsn AND r.body IS NULL))""",
            partitions,
            [epochs[p] for p in partitions],
            *columns,
        )

    async def _prune_below_base(self, partition: int, rows_max: int) -> None:
        """After a full checkpoint: delete every version below the base, a bounded
        statement at a time (they are invisible already; an owner's base only grows)."""
        while True:
            status = await self._pool.execute(
                """DELETE FROM partition_rows WHERE ctid = ANY(ARRAY(
                       SELECT r.ctid FROM partition_rows r JOIN partitions p USING (partition)
                        WHERE r.partition = $1 AND r.checkpoint_lsn < p.checkpoint_base_lsn
                        LIMIT $2))""",
                partition,
                rows_max,
            )
            if int(status.rsplit(" ", 1)[1]) < rows_max:
                return

    async def _lost(self, partitions: Sequence[int], epochs: Mapping[int, int]) -> list[int]:
        current = await self.epochs(partitions)
        return sorted(p for p in partitions if current.get(p) != epochs[p])

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
            # Every visible version; the newest of each row wins below (GC keeps about one
            # per row, so this costs less than sorting them in the database).
            rows = await connection.fetch(
                """SELECT r.partition, r.table_name, r.row_key::text AS row_key,
                          r.body::text AS body, r.checkpoint_lsn
                     FROM partition_rows r JOIN partitions p ON p.partition = r.partition
                    WHERE r.partition = ANY($1::integer[])
                      AND r.checkpoint_lsn BETWEEN p.checkpoint_base_lsn AND p.checkpoint_lsn""",
                wanted,
            )
            tail = await connection.fetch(
                """SELECT l.partition, l.first_lsn, l.last_lsn, l.epoch, l.records
                     FROM ledger_batches l JOIN partitions p ON p.partition = l.partition
                    WHERE l.partition = ANY($1::integer[]) AND l.last_lsn > p.checkpoint_lsn
                    ORDER BY l.partition, l.last_lsn""",
                wanted,
            )
        newest: dict[tuple[int, str, str], asyncpg.Record] = {}
        for r in rows:
            at = (r["partition"], r["table_name"], r["row_key"])
            seen = newest.get(at)
            if seen is None or seen["checkpoint_lsn"] < r["checkpoint_lsn"]:
                newest[at] = r
        tables_by: dict[int, dict[str, list[tuple[object, object]]]] = defaultdict(dict)
        for (partition, name, row_key), r in newest.items():
            if r["body"] is None:  # removed at that checkpoint
                continue
            schema = TABLES[name]
            row = (
                schema.key_from_data(json.loads(row_key)),
                schema.row_from_data(json.loads(r["body"])),
            )
            tables_by[partition].setdefault(name, []).append(row)
        tail_by = defaultdict(list)
        for r in tail:
            tail_by[r["partition"]].extend(_ledger_rows(r))
        loaded = {}
        for partition in wanted:
            checkpoint_lsn, head_lsn = heads[partition]
            restored = Partition.restore(partition, checkpoint_lsn, tables_by[partition])
            for stored in tail_by[partition]:
                if (
                    stored.lsn > checkpoint_lsn
                ):  # checkpoints fall between flushes: rows never straddle
                    restored.replay(stored.record)
            if restored.head_lsn != head_lsn:
                raise AssertionError(
                    f"partition {partition}: ledger ends at {restored.head_lsn}, head is {head_lsn}"
                )
            loaded[partition] = restored
        return loaded


# ------------------------------------------------------------------------------ helpers


def _ledger_rows(row: asyncpg.Record) -> list[LedgerRow]:
    """Decode a stored row's records (they must be the lsns the row says it holds)."""
    partition, epoch = row["partition"], row["epoch"]
    records = decode_records(partition, row["first_lsn"], row["last_lsn"], row["records"])
    return [LedgerRow(partition, record.lsn, epoch, record) for record in records]


def _json(data: object) -> str:
    """Compact JSON text (the columns are jsonb: PostgreSQL keeps its own form of it)."""
    return orjson.dumps(data).decode()


def _groups(pieces: Sequence[CheckpointDelta], rows_max: int) -> list[list[CheckpointDelta]]:
    """Consecutive pieces (each within rows_max rows) gathered up to rows_max rows a group."""
    groups: list[list[CheckpointDelta]] = []
    rows = rows_max
    for piece in pieces:
        size = piece.row_count
        if not groups or rows + size > rows_max:
            groups.append([])
            rows = 0
        groups[-1].append(piece)
        rows += size
    return groups


def _encode_rows(
    pieces: Sequence[CheckpointDelta],
) -> tuple[list[list[object]], list[list[object]]]:
    """The pieces' rows as columns (partition, table, key, body or None, lsn), JSON-encoded,
    and the columns that prune what they supersede (partition, table, key, lsn). A full
    piece prunes nothing by key: everything below its base goes (``_prune_below_base``)."""
    rows: list[tuple[object, ...]] = []
    keys: list[tuple[object, ...]] = []
    for piece in pieces:
        for name, changes in piece.tables.items():
            schema = TABLES[name]
            at = (piece.partition, name)
            written = len(rows)
            for key, row in changes.upserts:
                body = _json(schema.row_to_data(row))
                rows.append((*at, _json(schema.key_to_data(key)), body, piece.lsn))
            for key in changes.removals:
                rows.append((*at, _json(schema.key_to_data(key)), None, piece.lsn))
            if not piece.full:
                keys.extend((p, n, k, lsn) for p, n, k, _, lsn in rows[written:])
    return _columns(rows, 5), _columns(keys, 4)


def _columns(rows: list[tuple[object, ...]], width: int) -> list[list[object]]:
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]
