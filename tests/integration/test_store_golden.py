"""Checkpoints and ledger rows as release 7de2ac4 stored them load after migration 0003.

The golden fixtures (tests/core/golden/v1) are written into the schema of migrations 1-2
exactly as that release's store wrote them (typed ``stock`` columns, reservation and
idempotency bodies, ledger payloads); then 0003 folds them into ``partition_rows`` and the
store loads the partition: the same state as the fixtures' final state, and every retry
gets its original answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import asyncpg
import pytest

from inventory_core import Partition, command_from_data, outcome_from_data
from persistence.migrate import Migration, migrations
from persistence.store import PartitionStore
from tests.core.test_golden import expected_state, final_state, ledger, load

pytestmark = pytest.mark.pg


async def _apply(connection: asyncpg.Connection, wanted: list[Migration]) -> None:
    await connection.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version integer PRIMARY KEY, name text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    for migration in wanted:
        async with connection.transaction():
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )


async def _write_as_release_7de2ac4(connection: asyncpg.Connection) -> int:
    checkpoint = load("checkpoint.json")
    stored = ledger()
    partition = checkpoint["partition"]
    await connection.execute(
        """INSERT INTO partitions (partition, epoch, owner, head_lsn, checkpoint_lsn)
           VALUES ($1, 1, 'old', $2, $3)""",
        partition,
        stored[-1]["lsn"],
        checkpoint["lsn"],
    )
    for r in stored:
        payload = r["payload"]
        await connection.execute(
            """INSERT INTO ledger (partition, lsn, epoch, recorded_at, kind, merchant_id,
                                   idempotency_key, payload, changes)
               VALUES ($1, $2, 1, to_timestamp($3 / 1000.0), $4, $5, $6, $7::jsonb, $8::jsonb)""",
            partition,
            r["lsn"],
            payload["now_ms"],
            r["kind"],
            payload.get("merchant_id") or (payload.get("key") or [None])[0],
            payload.get("idempotency_key"),
            json.dumps(payload),
            json.dumps(r["changes"]),
        )
    for s in checkpoint["stock"]:
        on_hand, reserved, safety_stock, version = s["row"]
        await connection.execute(
            """INSERT INTO stock (merchant_id, location_id, sku_id, partition, on_hand, reserved,
                                  safety_stock, version, checkpoint_lsn)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            s["merchant_id"],
            s["location_id"],
            s["sku_id"],
            partition,
            on_hand,
            reserved,
            safety_stock,
            version,
            checkpoint["lsn"],
        )
    for body in checkpoint["reservations"]:
        await connection.execute(
            """INSERT INTO reservations (reservation_id, partition, merchant_id, location_id,
                                         state, expires_at, state_changed_at, body)
               VALUES ($1, $2, $3, $4, $5, to_timestamp($6 / 1000.0), to_timestamp($7 / 1000.0),
                       $8::jsonb)""",
            body["reservation_id"],
            partition,
            body["merchant_id"],
            body["location_id"],
            body["state"],
            body["expires_at_ms"],
            body["state_changed_at_ms"],
            json.dumps(body),
        )
    for entry in checkpoint["idempotency"]:
        await connection.execute(
            """INSERT INTO idempotency (partition, merchant_id, idempotency_key, recorded_at_ms,
                                        body)
               VALUES ($1, $2, $3, $4, $5::jsonb)""",
            partition,
            entry["merchant_id"],
            entry["idempotency_key"],
            entry["body"]["recorded_at_ms"],
            json.dumps(entry["body"]),
        )
    return int(partition)


def test_release_7de2ac4_checkpoint_and_ledger_load_after_migration(database_url: str) -> None:
    async def main() -> Partition:
        connection = await asyncpg.connect(database_url)
        try:
            every = migrations()
            await _apply(connection, [m for m in every if m.version <= 2])
            partition = await _write_as_release_7de2ac4(connection)
            await _apply(connection, [m for m in every if m.version > 2])
            views = await connection.fetch(
                "SELECT sku_id, on_hand, available FROM stock ORDER BY sku_id"
            )
            assert [r["sku_id"] for r in views] == ["sku-a", "sku-b", "sku-c"]
        finally:
            await connection.close()
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            return (await PartitionStore(pool).load([partition]))[partition]
        finally:
            await pool.close()

    loaded = asyncio.run(main())
    loaded.check_invariants()
    assert final_state(loaded) == expected_state()
    later_ms = command_from_data(ledger()[-1]["payload"]).now_ms + 1000
    for retry in load("retries.json"):
        command = dataclasses.replace(command_from_data(retry["command"]), now_ms=later_ms)
        assert loaded.apply(command).outcome == outcome_from_data(retry["outcome"])
