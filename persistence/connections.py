"""Connection pools for the composition roots, so nothing else needs to know asyncpg."""

from __future__ import annotations

import asyncpg

# Nothing waits on the database without bound (DESIGN section 5.7); the server enforces each
# bound on every connection of every pool:
# - A statement slower than this is cancelled: a stuck flush must fail (and fail-stop its
#   partitions) rather than hold the owner's loop forever. Recovery of a million keys reads
#   well inside it.
STATEMENT_TIMEOUT_S = 30.0
# - A lock wait longer than this fails the statement: a flush behind a takeover fails (and
#   its partitions recover or are given up), a takeover behind anything is retried at the
#   next poll. Flushes and checkpoint commits hold their locks for milliseconds.
LOCK_TIMEOUT_S = 2.0
# - A session idle inside a transaction this long is ended by the server, which releases its
#   locks: an owner paused (SIGSTOP, a VM freeze) inside a flush cannot hold the takeover of
#   its partitions past its lease plus this. Our transactions never wait on anything but the
#   database between their statements.
IDLE_IN_TRANSACTION_TIMEOUT_S = 2.0
# The client gives the server's own timeout a moment to answer first.
CLIENT_TIMEOUT_MARGIN_S = 5.0


def session_settings(application_name: str) -> dict[str, str]:
    """The per-connection settings every pool of the service uses; ``application_name``
    names the process in pg_stat_activity (and in the server's log)."""
    return {
        "application_name": application_name,
        "statement_timeout": f"{int(STATEMENT_TIMEOUT_S * 1000)}",
        "lock_timeout": f"{int(LOCK_TIMEOUT_S * 1000)}",
        "idle_in_transaction_session_timeout": f"{int(IDLE_IN_TRANSACTION_TIMEOUT_S * 1000)}",
    }


async def create_pool(
    database_url: str, size_max: int, application_name: str = "inventory"
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size_max,
        command_timeout=STATEMENT_TIMEOUT_S + CLIENT_TIMEOUT_MARGIN_S,
        server_settings=session_settings(application_name),
        reset=_keep_session,
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


async def _keep_session(connection: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is (asyncpg still rolls back a transaction
    left open). Its default reset (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) is one
    more round trip per acquire, every flush included; the service leaves no session state
    to reset: it sets only transaction-local
    settings (SET LOCAL), takes no session advisory lock, opens no cursor outside a
    transaction and listens to nothing."""
    return None
