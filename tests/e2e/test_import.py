"""``inventory import``: a stock-take through the router as one batch, real processes.

A file of 2,500 counts over five stores, with a few bad lines, is imported with the CLI:
the good lines set their keys, every bad one is refused with its line number, field and
reason, every ledger record of the import carries the batch id, and the exit status says
that lines were refused. Importing the same file again changes nothing: every line is a
duplicate.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from shard_router.importer import run_import
from tests.conftest import Cluster, start_cluster
from tests.e2e.ledger import ingest_records

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

MERCHANT = "m-import"
STORES = tuple(f"store-{i}" for i in range(5))
SKUS = 500
CALL_TIMEOUT_S = 20.0
IMPORT_TIMEOUT_S = 120.0
BAD_LINES = {  # line number (the header is line 1) -> (CSV row, refused field)
    7: ("sku-x,store-0,twelve", "count"),
    300: (",store-1,5", "sku_id"),
    1201: ("sku-y,store-2,-4", "count"),
    2002: ("sku z,store-3,3", "key.sku_id"),
}


@pytest.fixture
def cluster(database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    running = start_cluster(database_url, tmp_path, shards=2)
    try:
        yield running
    finally:
        running.stop()


def count_of(store: int, sku: int) -> int:
    return (store * 7 + sku * 3) % 50


def write_counts(path: Path) -> dict[tuple[str, str], int]:
    expected: dict[tuple[str, str], int] = {}
    rows = ["sku_id,location_id,count"]
    for store in range(len(STORES)):
        for sku in range(SKUS):
            line_number = len(rows) + 1
            if line_number in BAD_LINES:
                rows.append(BAD_LINES[line_number][0])
                continue
            rows.append(f"sku-{sku},{STORES[store]},{count_of(store, sku)}")
            expected[(STORES[store], f"sku-{sku}")] = count_of(store, sku)
    path.write_text("\n".join(rows) + "\n")
    return expected


async def levels(address: str, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    found = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InventoryStub(channel)
        for start in range(0, len(wanted), 1000):
            chunk = wanted[start : start + 1000]
            request = pb.GetAvailabilityRequest(
                keys=[
                    pb.InventoryKey(merchant_id=MERCHANT, sku_id=s, location_id=loc)
                    for loc, s in chunk
                ]
            )
            answer = await stub.GetAvailability(request, timeout=CALL_TIMEOUT_S)
            found.update(
                {where: level.on_hand for where, level in zip(chunk, answer.levels, strict=True)}
            )
    return found


async def batch_ids_in_ledger(database_url: str) -> set[str]:
    return {record.batch_id for record in await ingest_records(database_url)}


def test_a_stock_take_imports_as_one_batch_refuses_bad_lines_and_imports_again_as_a_no_op(
    cluster: Cluster, database_url: str, tmp_path: Path
) -> None:
    counts = tmp_path / "counts.csv"
    expected = write_counts(counts)
    report = tmp_path / "report.json"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable, "-m", "shard_router", "import", str(counts),
            "--merchant-id", MERCHANT, "--address", cluster.router.address,
            "--batch-id", "stocktake-1", "--report", str(report), "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # lines were refused
    summary = json.loads(report.read_text())
    assert summary["batch_id"] == "stocktake-1"
    assert summary["lines"] == len(STORES) * SKUS
    assert summary["applied"] == len(expected)
    assert summary["failed"] == 0
    refused = {r["line"]: r["field"] for r in summary["refused"]}
    assert refused == {line: field for line, (_, field) in BAD_LINES.items()}
    assert all(r["reason"] for r in summary["refused"])
    assert "4 refused" in done.stdout
    print(f"imported {summary['lines']} lines in {time.monotonic() - started:.1f} s")

    found = asyncio.run(levels(cluster.router.address, sorted(expected)))
    assert found == expected
    assert asyncio.run(batch_ids_in_ledger(database_url)) == {"stocktake-1"}

    again = asyncio.run(
        run_import(
            counts,
            address=cluster.router.address,
            merchant_id=MERCHANT,
            batch_id="stocktake-1",
            progress=False,
        )
    )
    assert (again.applied, again.duplicates, again.failed) == (0, len(expected), 0)
    assert len(again.refused) == len(BAD_LINES)
    assert asyncio.run(levels(cluster.router.address, sorted(expected))) == expected
