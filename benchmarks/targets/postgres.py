"""Baseline (a): the textbook PostgreSQL reservation, through an asyncpg pool.

One transaction per reservation: per line (summed per key, in key order so that concurrent
carts cannot deadlock) a conditional

    UPDATE stock SET reserved = reserved + $q
     WHERE <key> AND on_hand - reserved - safety_stock >= $q

and, when every line matched one row, an INSERT of the reservation row; any line that
matches no row rolls the whole transaction back (FAILED_PRECONDITION). Commit and release
move the row out of 'active' and give the units back (commit also takes them out of
on_hand). Expiry is the reservation row's ``expires_at``; no sweeper runs during a
benchmark (the same holds for the Redis baseline), so expired units stay counted.

Its tables live in their own schema (``SCHEMA``) of the database the DSN names, dropped and
re-created by ``prepare``; the catalogue is loaded with COPY.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from ..workloads import Catalogue, Key
from . import INSUFFICIENT, OK, Answer, Level, ReservationRef, TargetSpec

SCHEMA = "bench_baseline_pg"
# Rows per COPY: big enough to amortise round trips, small enough to stay in memory.
COPY_ROWS_PER_CALL = 100_000
# Keys per audit query.
AUDIT_KEYS_PER_QUERY = 10_000

DDL = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.stock (
    merchant_id   text   NOT NULL,
    location_id   text   NOT NULL,
    sku_id        text   NOT NULL,
    on_hand       bigint NOT NULL,
    reserved      bigint NOT NULL DEFAULT 0,
    safety_stock  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (merchant_id, location_id, sku_id)
);
CREATE TABLE {SCHEMA}.reservations (
    reservation_id   text        PRIMARY KEY,
    merchant_id      text        NOT NULL,
    location_id      text        NOT NULL,
    idempotency_key  text        NOT NULL,
    state            text        NOT NULL,
    lines            jsonb       NOT NULL,
    expires_at       timestamptz NOT NULL,
    UNIQUE (merchant_id, idempotency_key)
);
"""

RESERVE_LINE = f"""
UPDATE {SCHEMA}.stock SET reserved = reserved + $4
 WHERE merchant_id = $1 AND location_id = $2 AND sku_id = $3
   AND on_hand - reserved - safety_stock >= $4
"""
INSERT_RESERVATION = f"""
INSERT INTO {SCHEMA}.reservations
    (reservation_id, merchant_id, location_id, idempotency_key, state, lines, expires_at)
VALUES ($1, $2, $3, $4, 'active', $5::jsonb, now() + make_interval(secs => $6))
"""
FINISH_RESERVATION = f"""
UPDATE {SCHEMA}.reservations SET state = $3
 WHERE reservation_id = $1 AND merchant_id = $2 AND state = 'active' AND expires_at > now()
RETURNING location_id, lines
"""
GIVE_BACK = f"""
UPDATE {SCHEMA}.stock SET reserved = reserved - $4, on_hand = on_hand - $5
 WHERE merchant_id = $1 AND location_id = $2 AND sku_id = $3
"""


def summed(lines: Sequence[tuple[Key, int]]) -> list[tuple[Key, int]]:
    totals: dict[Key, int] = {}
    for key, quantity in lines:
        totals[key] = totals.get(key, 0) + quantity
    return sorted(totals.items(), key=lambda item: item[0].sku_id)


class PostgresClient:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, spec: TargetSpec, concurrency: int) -> PostgresClient:
        size = max(1, min(spec.pool_size, concurrency))
        pool = await asyncpg.create_pool(
            spec.address, min_size=size, max_size=size, command_timeout=spec.call_timeout_s
        )
        return cls(pool)

    async def reserve(
        self, lines: Sequence[tuple[Key, int]], ttl_s: int, idempotency_key: str
    ) -> Answer:
        lines = summed(lines)
        first = lines[0][0]
        reservation_id = uuid.uuid4().hex  # any unique id will do; the audit never replays
        body = json.dumps([[k.sku_id, q] for k, q in lines])
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                for key, quantity in lines:
                    status = await connection.execute(
                        RESERVE_LINE, key.merchant_id, key.location_id, key.sku_id, quantity
                    )
                    if status != "UPDATE 1":
                        raise _Insufficient
                await connection.execute(
                    INSERT_RESERVATION,
                    reservation_id,
                    first.merchant_id,
                    first.location_id,
                    idempotency_key,
                    body,
                    float(ttl_s),
                )
        except _Insufficient:
            return Answer(INSUFFICIENT)
        except (asyncpg.PostgresError, OSError, TimeoutError) as error:
            return Answer(_code(error))
        return Answer(OK, reservation_id)

    async def _finish(self, key: Key, reservation_id: str, state: str) -> Answer:
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                row = await connection.fetchrow(
                    FINISH_RESERVATION, reservation_id, key.merchant_id, state
                )
                if row is None:
                    return Answer(INSUFFICIENT, reservation_id)  # not active any more
                for sku_id, quantity in json.loads(row["lines"]):
                    taken = quantity if state == "committed" else 0
                    await connection.execute(
                        GIVE_BACK, key.merchant_id, row["location_id"], sku_id, quantity, taken
                    )
        except (asyncpg.PostgresError, OSError, TimeoutError) as error:
            return Answer(_code(error), reservation_id)
        return Answer(OK, reservation_id)

    async def commit(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        return await self._finish(key, reservation_id, "committed")

    async def release(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        return await self._finish(key, reservation_id, "released")

    async def read(self, keys: Sequence[Key]) -> Answer:
        first = keys[0]
        try:
            await self._pool.fetch(
                f"SELECT on_hand - reserved - safety_stock FROM {SCHEMA}.stock"
                " WHERE merchant_id = $1 AND location_id = $2 AND sku_id = ANY($3::text[])",
                first.merchant_id,
                first.location_id,
                [k.sku_id for k in keys],
            )
        except (asyncpg.PostgresError, OSError, TimeoutError) as error:
            return Answer(_code(error))
        return Answer(OK)

    async def close(self) -> None:
        await self._pool.close()


class _Insufficient(Exception):
    """Rolls the reservation's transaction back (a line had too little available)."""


def _code(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "DEADLINE_EXCEEDED"
    if isinstance(error, asyncpg.UniqueViolationError):
        return "ALREADY_EXISTS"
    return "UNAVAILABLE"


class PostgresTarget:
    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.server_pids: list[int] = []
        self.unavailable: str | None = None
        self._connection: asyncpg.Connection | None = None

    async def _connect(self) -> asyncpg.Connection:
        if self._connection is None:
            self._connection = await asyncpg.connect(self.spec.address)
        return self._connection

    async def prepare(self) -> None:
        connection = await self._connect()
        await connection.execute(DDL)
        self.server_pids = await postmaster_pids(connection)

    async def load(self, catalogue: Catalogue) -> None:
        connection = await self._connect()
        batch: list[tuple[str, str, str, int]] = []
        for key in catalogue.all_keys():
            batch.append((key.merchant_id, key.location_id, key.sku_id, catalogue.stock_per_key))
            if len(batch) >= COPY_ROWS_PER_CALL:
                await self._copy(connection, batch)
                batch = []
        if batch:
            await self._copy(connection, batch)
        await connection.execute(f"ANALYZE {SCHEMA}.stock")

    async def _copy(
        self, connection: asyncpg.Connection, rows: list[tuple[str, str, str, int]]
    ) -> None:
        await connection.copy_records_to_table(
            "stock",
            schema_name=SCHEMA,
            records=rows,
            columns=["merchant_id", "location_id", "sku_id", "on_hand"],
        )

    async def load_key(self, key: Key, on_hand: int) -> None:
        connection = await self._connect()
        await connection.execute(
            f"INSERT INTO {SCHEMA}.stock (merchant_id, location_id, sku_id, on_hand)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (merchant_id, location_id, sku_id)"
            " DO UPDATE SET on_hand = EXCLUDED.on_hand",
            key.merchant_id,
            key.location_id,
            key.sku_id,
            on_hand,
        )

    async def levels(self, keys: Sequence[Key]) -> dict[Key, Level]:
        connection = await self._connect()
        found: dict[Key, Level] = {}
        for start in range(0, len(keys), AUDIT_KEYS_PER_QUERY):
            chunk = keys[start : start + AUDIT_KEYS_PER_QUERY]
            rows = await connection.fetch(
                f"SELECT s.merchant_id, s.location_id, s.sku_id, on_hand, reserved, safety_stock"
                f" FROM {SCHEMA}.stock s JOIN unnest($1::text[], $2::text[], $3::text[])"
                " AS k(m, l, s2) ON s.merchant_id = k.m AND s.location_id = k.l"
                " AND s.sku_id = k.s2",
                [k.merchant_id for k in chunk],
                [k.location_id for k in chunk],
                [k.sku_id for k in chunk],
            )
            for row in rows:
                key = Key(row["merchant_id"], row["location_id"], row["sku_id"])
                found[key] = Level(row["on_hand"], row["reserved"], row["safety_stock"])
        return found

    async def reservation_states(self, refs: Sequence[ReservationRef]) -> dict[str, str | None]:
        connection = await self._connect()
        rows = await connection.fetch(
            f"SELECT reservation_id, state, expires_at <= now() AS expired"
            f" FROM {SCHEMA}.reservations WHERE reservation_id = ANY($1::text[])",
            [ref.reservation_id for ref in refs],
        )
        states: dict[str, str | None] = {ref.reservation_id: None for ref in refs}
        for row in rows:
            expired = row["state"] == "active" and row["expired"]
            states[row["reservation_id"]] = "expired" if expired else row["state"]
        return states

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


async def postmaster_pids(connection: asyncpg.Connection) -> list[int]:
    """The postmaster's pid (its children are the backends), when the server is local."""
    try:
        data_directory = await connection.fetchval("SHOW data_directory")
        pidfile = Path(data_directory) / "postmaster.pid"
        text = await asyncio.to_thread(pidfile.read_text, encoding="utf-8")
        return [int(text.splitlines()[0].strip())]
    except (asyncpg.PostgresError, OSError, ValueError, IndexError):
        return []
