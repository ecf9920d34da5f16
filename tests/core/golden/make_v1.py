"""How the v1 golden fixtures were made: run once against release 7de2ac4, then frozen.

Do not run this again: the fixtures stand for what that release wrote (ledger payloads,
checkpoint rows and idempotency entries, including its repr-based fingerprints), and
tests/core/test_golden.py proves today's code still replays them and answers their retries.
Kept for the record of how each file's shape maps to what the store wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from inventory_core import (
    AdjustmentReason,
    AdjustStock,
    Commit,
    Extend,
    InventoryKey,
    Line,
    Partition,
    Release,
    Reserve,
    SetSafetyStock,
    SetStock,
    command_to_data,
    event_to_data,
    outcome_to_data,
    partition_of,
    reservation_to_data,
    row_to_data,
)

HERE = Path(__file__).parent / "v1"
MERCHANT, LOCATION = "m-golden", "loc-1"
T0_MS = 1_780_000_000_000
PARTITION = partition_of(MERCHANT, LOCATION)


def key(sku: str) -> InventoryKey:
    return InventoryKey(MERCHANT, sku, LOCATION)


def commands() -> list[object]:
    a, b, c = key("sku-a"), key("sku-b"), key("sku-c")
    t = T0_MS
    return [
        SetStock(a, "set-a", 10, None, t + 1),
        SetStock(b, "set-b", 3, None, t + 2),
        SetStock(c, "set-c", 50, 0, t + 3),
        SetSafetyStock(a, "safety-a", 2, None, t + 4),
        Reserve(MERCHANT, "cart-1", (Line(a, 2), Line(b, 1), Line(a, 1)), 0, t + 5),
        Reserve(MERCHANT, "cart-2", (Line(c, 5),), 600, t + 6),
        AdjustStock(c, "receipt-1", 20, AdjustmentReason.RECEIPT, t - 60_000, t + 7),
        # checkpoint here (after 7 records)
        Commit(MERCHANT, "commit-1", f"r{PARTITION:04d}-0000000005", (Line(a, 2),), t + 8),
        Release(MERCHANT, "release-2", f"r{PARTITION:04d}-0000000006", t + 9),
        Reserve(MERCHANT, "cart-3", (Line(b, 2),), 30, t + 10),
        Extend(MERCHANT, "extend-3", f"r{PARTITION:04d}-0000000010", 60, t + 11),
        AdjustStock(b, "pos-sale-1", -3, AdjustmentReason.SALE, t + 5, t + 12),
        # 61 s later cart-3 is due: the next command expires it first
        SetStock(c, "set-c-2", 40, 4, t + 75_000),
    ]


def main() -> None:
    p = PARTITION
    core = Partition(p)
    ledger, retries, checkpoint = [], [], None
    for index, command in enumerate(commands()):
        step = core.apply(command)
        for record in step.records:
            changes = [event_to_data(e) for e in step.events if e.lsn == record.lsn]
            ledger.append(
                {
                    "partition": p,
                    "lsn": record.lsn,
                    "kind": record.kind,
                    "payload": command_to_data(record.command),
                    "changes": changes,
                }
            )
        retries.append(
            {
                "command": command_to_data(command),
                "outcome": outcome_to_data(step.outcome),
            }
        )
        if index == 6:
            delta = core.take_checkpoint()
            checkpoint = {
                "partition": p,
                "lsn": delta.lsn,
                "stock": [
                    {
                        "merchant_id": k.merchant_id,
                        "location_id": k.location_id,
                        "sku_id": k.sku_id,
                        "row": row_to_data(r),
                    }
                    for k, r in delta.stock
                ],
                "reservations": [reservation_to_data(r) for r in delta.reservations],
                "idempotency": [
                    {
                        "merchant_id": e.merchant_id,
                        "idempotency_key": e.idempotency_key,
                        "body": {
                            "kind": e.kind,
                            "fingerprint": e.fingerprint,
                            "outcome": outcome_to_data(e.outcome),
                            "lsn": e.lsn,
                            "recorded_at_ms": e.recorded_at_ms,
                        },
                    }
                    for e in delta.idempotency
                ],
            }
    snapshot = core.snapshot()
    final = {
        "partition": p,
        "head_lsn": snapshot.head_lsn,
        "stock": [
            {"key": [k.merchant_id, k.sku_id, k.location_id], "row": row_to_data(r)}
            for k, r in sorted(snapshot.stock.items())
        ],
        "reservations": [reservation_to_data(r) for _, r in sorted(snapshot.reservations.items())],
        "idempotency": [
            {
                "merchant_id": m,
                "idempotency_key": k,
                "kind": e.kind,
                "outcome": outcome_to_data(e.outcome),
                "lsn": e.lsn,
            }
            for (m, k), e in sorted(snapshot.idempotency.items())
        ],
    }
    HERE.mkdir(exist_ok=True)
    lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in ledger)
    (HERE / "ledger.jsonl").write_text(lines)
    for name, value in (("checkpoint", checkpoint), ("retries", retries), ("final_state", final)):
        (HERE / f"{name}.json").write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
