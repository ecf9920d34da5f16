"""Versioned SQL migrations, applied in order by ``inventory migrate`` and at start.

Files are ``migrations/NNNN_name.sql``; each runs once, in its own transaction, under an
advisory lock so that processes starting together do not race. ``schema_migrations`` lists
what ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TypeAlias

import asyncpg
import structlog

log = structlog.get_logger(__name__)

Connection: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)

# Any constant shared by every process of this service; it only serialises migrators.
MIGRATION_LOCK_ID = 0x1D_EA_57_0C
MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("persistence").joinpath("migrations").iterdir():
        match = MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..N without gaps, got {versions}")
    return found


async def migrate(connection: Connection) -> list[int]:
    """Apply every migration not yet applied; returns the versions applied now."""
    applied_now = []
    async with connection.transaction():
        # A migration may rewrite a large table, and a process starting meanwhile waits for
        # it on the lock: neither is bounded by the service's session timeouts.
        await connection.execute("SET LOCAL statement_timeout = 0")
        await connection.execute("SET LOCAL lock_timeout = 0")
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")
        }
        for migration in migrations():
            if migration.version in done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
            log.info("migration_applied", version=migration.version, name=migration.name)
    return applied_now


async def ensure_partitions(connection: Connection, partition_count: int) -> None:
    """Create the partition rows (idempotent)."""
    await connection.execute(
        """INSERT INTO partitions (partition)
           SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING""",
        partition_count,
    )
