"""What the e2e tests read back from PostgreSQL: the feed records every flush wrote, who owns
each partition, and whether the ledger is fenced and contiguous."""

from __future__ import annotations

import asyncpg

from inventory_core import Ingest
from persistence.ledger import decode_records


async def ingest_records(database_url: str) -> list[Ingest]:
    """Every Ingest record of the ledger (each holds the events it recorded)."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT partition, first_lsn, last_lsn, records FROM ledger_batches"
        )
    finally:
        await connection.close()
    found = []
    for row in rows:
        for record in decode_records(
            row["partition"], row["first_lsn"], row["last_lsn"], row["records"]
        ):
            if isinstance(record.command, Ingest):
                found.append(record.command)
    return found


async def owners(database_url: str) -> dict[int, tuple[str, int]]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT partition, owner, epoch FROM partitions")
        return {r["partition"]: (r["owner"], r["epoch"]) for r in rows}
    finally:
        await connection.close()


async def ledger_is_fenced_and_contiguous(database_url: str) -> None:
    """Per partition: lsns 1..head without gaps, epochs never decreasing along them."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT partition, generate_series(first_lsn, last_lsn) AS lsn, epoch"
            " FROM ledger_batches ORDER BY partition, lsn"
        )
        heads = {
            r["partition"]: r["head_lsn"]
            for r in await connection.fetch("SELECT partition, head_lsn FROM partitions")
        }
    finally:
        await connection.close()
    last: dict[int, tuple[int, int]] = {}
    for row in rows:
        previous_lsn, previous_epoch = last.get(row["partition"], (0, 0))
        assert row["lsn"] == previous_lsn + 1, dict(row)
        assert row["epoch"] >= previous_epoch, dict(row)
        last[row["partition"]] = (row["lsn"], row["epoch"])
    for partition, (lsn, _) in last.items():
        assert heads[partition] == lsn
