"""What the e2e tests read back from the ledger: the feed records every flush wrote."""

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
