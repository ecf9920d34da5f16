"""Membership: which shard processes are alive, by heartbeat rows in ``shards``.

A shard inserts its row at start, refreshes ``heartbeat_at`` every heartbeat period and
deletes it on an orderly stop. A member is alive while its heartbeat is younger than the
lease; all times are the database's ``now()``, so process clocks do not matter. Routers and
shards read the same table and compute the same ring from it; ownership itself is enforced by
partition epochs (store.py), so a wrong view of membership costs retries, never correctness.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True, slots=True, order=True)
class Member:
    shard_id: str
    address: str


class Membership:
    def __init__(self, pool: asyncpg.Pool, lease_s: float) -> None:
        self._pool = pool
        self.lease_s = lease_s

    async def heartbeat(self, shard_id: str, address: str) -> None:
        """Join or stay alive."""
        await self._pool.execute(
            """INSERT INTO shards (shard_id, address, started_at, heartbeat_at)
               VALUES ($1, $2, now(), now())
               ON CONFLICT (shard_id) DO UPDATE
                  SET address = EXCLUDED.address, heartbeat_at = now()""",
            shard_id,
            address,
        )

    async def leave(self, shard_id: str) -> None:
        await self._pool.execute("DELETE FROM shards WHERE shard_id = $1", shard_id)

    async def alive(self) -> list[Member]:
        rows = await self._pool.fetch(
            """SELECT shard_id, address FROM shards
                WHERE heartbeat_at > now() - make_interval(secs => $1)
                ORDER BY shard_id""",
            self.lease_s,
        )
        return [Member(r["shard_id"], r["address"]) for r in rows]
