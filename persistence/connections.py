"""Connection pools for the composition roots, so nothing else needs to know asyncpg."""

from __future__ import annotations

import asyncpg

# A statement slower than this is cancelled: a stuck flush must fail (and fail-stop the
# partitions) rather than hold the owner's loop forever.
STATEMENT_TIMEOUT_S = 30.0


async def create_pool(database_url: str, size_max: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size_max,
        command_timeout=STATEMENT_TIMEOUT_S,
    )
    assert pool is not None
    return pool


async def migrate_database(database_url: str) -> list[int]:
    """Apply pending migrations; the versions applied now."""
    from .migrate import migrate

    connection = await asyncpg.connect(database_url)
    try:
        return await migrate(connection)
    finally:
        await connection.close()
