"""Quick throughput run: reservations/s through InventoryClient, batched vs unary.

    python -m tests.client.bench_throughput [--seconds 3] [--callers 1,64,256]

Starts an embedded PostgreSQL and one real shard process on loopback, then for each number
of concurrent callers runs each mode for ``--seconds``: every caller loops reserving one
unit with a fresh idempotency key, on keys spread over 64 locations (partitions). Not a test
(pytest does not collect it); the numbers are for the report, not a gate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import asyncpg

from shard_router.client import InventoryClient, InventoryError, key, line
from tests.conftest import ShardProcess, with_database

LOCATIONS = 64
STOCK = 1_000_000_000


async def create_database(server_url: str, name: str) -> str:
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f"CREATE DATABASE {name}")
    finally:
        await connection.close()
    return with_database(server_url, name)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_mode(
    address: str, shard_pid: int, callers: int, *, batching: bool, seconds: float, tag: str
) -> str:
    async with InventoryClient(address, batching=batching) as client:
        keys = [key("m-bench", "sku-1", f"loc-{i}") for i in range(LOCATIONS)]
        for index, stock_key in enumerate(keys):
            await client.set_stock(stock_key, STOCK, idempotency_key=f"{tag}-stock-{index}")
        latencies_s: list[float] = []
        failures = 0
        stop_at = time.monotonic() + seconds

        async def caller(number: int) -> None:
            nonlocal failures
            sequence = 0
            while time.monotonic() < stop_at:
                sequence += 1
                started = time.monotonic()
                try:
                    await client.reserve(
                        [line(keys[(number + sequence) % LOCATIONS], 1)],
                        idempotency_key=f"{tag}-{number}-{sequence}",
                    )
                except InventoryError:
                    failures += 1
                    continue
                latencies_s.append(time.monotonic() - started)

        began, client_cpu_s = time.monotonic(), time.process_time()
        shard_cpu_s = process_cpu_s(shard_pid)
        await asyncio.gather(*(caller(n) for n in range(callers)))
        elapsed_s = time.monotonic() - began
        client_cpu_s = time.process_time() - client_cpu_s
        shard_cpu_s = process_cpu_s(shard_pid) - shard_cpu_s
        stats = client.batcher_stats
        latencies_s.sort()
        p95_ms = latencies_s[int(len(latencies_s) * 0.95)] * 1000 if latencies_s else 0.0
        items_per_request = (
            f"{stats.items_sent / stats.requests_sent:6.1f}"
            if stats and stats.requests_sent
            else "     -"
        )
        mode = "batched" if batching else "unary  "
        return (
            f"{callers:4d} callers  {mode}  {len(latencies_s) / elapsed_s:8.0f} reservations/s"
            f"  p95 {p95_ms:7.1f} ms  items/BatchRequest {items_per_request}  failures {failures}"
            f"  CPU s: client {client_cpu_s:4.1f} shard {shard_cpu_s:4.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callers", default="1,64,256")
    options = parser.parse_args()
    from persistence.embedded import EmbeddedPostgres

    directory = Path(tempfile.mkdtemp(prefix="inv-bench-"))
    server = EmbeddedPostgres()
    shard: ShardProcess | None = None
    try:
        server_url = os.environ.get("INVENTORY_TEST_DATABASE_URL") or server.start(
            directory / "data"
        )
        database_url = asyncio.run(create_database(server_url, "inv_bench_" + os.urandom(4).hex()))
        shard = ShardProcess(database_url, directory)
        shard.start()
        print(f"shard at {shard.address}, {os.cpu_count()} CPUs, {options.seconds} s per run")
        for callers in (int(c) for c in options.callers.split(",")):
            for batching in (False, True):
                tag = f"{callers}-{'b' if batching else 'u'}"
                assert shard.process is not None
                pid = shard.process.pid
                print(
                    asyncio.run(
                        run_mode(
                            shard.address,
                            pid,
                            callers,
                            batching=batching,
                            seconds=options.seconds,
                            tag=tag,
                        )
                    )
                )
    finally:
        if shard is not None:
            shard.stop()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
