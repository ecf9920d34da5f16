"""What release 7de2ac4 wrote still means the same (tests/core/golden/v1, frozen).

The fixtures are that release's ledger records (payload and key changes, as the store kept
them), a checkpoint taken after its seventh record (stock rows, reservation bodies and
idempotency entries with that release's repr-based fingerprints), every command with the
answer it got, and the final state. Today's code must
  - replay the ledger from empty to the same state, with the same key changes;
  - restore the checkpoint, replay the tail, and reach the same state;
  - answer a retry of every command with its original answer, whether its idempotency entry
    came from the old checkpoint (old fingerprint) or from replay (new fingerprint);
  - refuse the same keys with another payload;
  - keep fingerprints unchanged when a command gains a field with a default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import inventory_core._registry as registry
from inventory_core import (
    TABLES,
    IdempotencyKeyReused,
    InventoryKey,
    Line,
    Partition,
    Record,
    Reserve,
    Step,
    command_from_data,
    event_to_data,
    fingerprint,
    key_from_data,
    outcome_from_data,
    reservation_from_data,
    row_from_data,
)
from inventory_core._codec import dataclass_codec
from inventory_core._idempotency import IdempotencyEntry

GOLDEN = Path(__file__).parent / "golden" / "v1"


def load(name: str) -> Any:
    return json.loads((GOLDEN / name).read_text())


def ledger() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (GOLDEN / "ledger.jsonl").read_text().splitlines()]


def records() -> list[Record]:
    return [Record(r["partition"], r["lsn"], command_from_data(r["payload"])) for r in ledger()]


def final_state(partition: Partition) -> dict[str, Any]:
    """The state in the fixtures' terms (fingerprints aside: they are recomputed on replay)."""
    snapshot = partition.snapshot()
    return {
        "head_lsn": snapshot.head_lsn,
        "stock": {
            k: [r.on_hand, r.reserved, r.safety_stock, r.version] for k, r in snapshot.stock.items()
        },
        "reservations": snapshot.reservations,
        "idempotency": {s: (e.kind, e.outcome, e.lsn) for s, e in snapshot.idempotency.items()},
    }


def expected_state() -> dict[str, Any]:
    final = load("final_state.json")
    return {
        "head_lsn": final["head_lsn"],
        "stock": {key_from_data(r["key"]): r["row"] for r in final["stock"]},
        "reservations": {
            r["reservation_id"]: reservation_from_data(r) for r in final["reservations"]
        },
        "idempotency": {
            (e["merchant_id"], e["idempotency_key"]): (
                e["kind"],
                outcome_from_data(e["outcome"]),
                e["lsn"],
            )
            for e in final["idempotency"]
        },
    }


def replayed_from_empty() -> Partition:
    stored = ledger()
    partition = Partition(stored[0]["partition"])
    for row, record in zip(stored, records(), strict=True):
        events = partition.replay(record)
        assert [event_to_data(e) for e in events] == row["changes"], record.lsn
    return partition


def restored_from_checkpoint() -> Partition:
    checkpoint = load("checkpoint.json")
    tables = {
        "stock": [
            (InventoryKey(r["merchant_id"], r["sku_id"], r["location_id"]), row_from_data(r["row"]))
            for r in checkpoint["stock"]
        ],
        "reservations": [
            (r["reservation_id"], reservation_from_data(r)) for r in checkpoint["reservations"]
        ],
        # The store's migration folds the scope columns into each entry's body.
        "idempotency": [
            (
                (e["merchant_id"], e["idempotency_key"]),
                TABLES["idempotency"].row_from_data(
                    e["body"]
                    | {"merchant_id": e["merchant_id"], "idempotency_key": e["idempotency_key"]}
                ),
            )
            for e in checkpoint["idempotency"]
        ],
    }
    partition = Partition.restore(checkpoint["partition"], checkpoint["lsn"], tables)
    for record in records()[checkpoint["lsn"] :]:
        partition.replay(record)
    return partition


@pytest.mark.parametrize("build", [replayed_from_empty, restored_from_checkpoint])
def test_the_old_ledger_and_checkpoint_rebuild_the_same_state(build: Any) -> None:
    partition = build()
    partition.check_invariants()
    assert final_state(partition) == expected_state()


@pytest.mark.parametrize("build", [replayed_from_empty, restored_from_checkpoint])
def test_retries_of_old_requests_get_their_original_answers(build: Any) -> None:
    partition = build()
    later_ms = records()[-1].command.now_ms + 1000
    for retry in load("retries.json"):
        command = dataclasses.replace(command_from_data(retry["command"]), now_ms=later_ms)
        step: Step = partition.apply(command)
        assert step.outcome == outcome_from_data(retry["outcome"]), command
        assert step.records == ()


def test_the_checkpoint_holds_old_fingerprints_and_they_still_match() -> None:
    partition = restored_from_checkpoint()
    entries = partition.snapshot().idempotency
    from_checkpoint = {
        (e["merchant_id"], e["idempotency_key"]) for e in load("checkpoint.json")["idempotency"]
    }
    assert from_checkpoint
    for scope in from_checkpoint:  # restored as written: the old form, no prefix
        assert not entries[scope].fingerprint.startswith("c1:")
    for scope, entry in entries.items():
        if scope not in from_checkpoint:  # recomputed on replay: the canonical form
            assert entry.fingerprint.startswith("c1:")


@pytest.mark.parametrize("build", [replayed_from_empty, restored_from_checkpoint])
def test_old_keys_with_another_payload_are_refused(build: Any) -> None:
    partition = build()
    later_ms = records()[-1].command.now_ms + 1000
    for retry in load("retries.json"):
        original = command_from_data(retry["command"])
        changed = _another_payload(original)
        step = partition.apply(dataclasses.replace(changed, now_ms=later_ms))
        assert isinstance(step.outcome, IdempotencyKeyReused), (original, step.outcome)


def _another_payload(command: Any) -> Any:
    if hasattr(command, "ttl_s"):
        return dataclasses.replace(command, ttl_s=900 if command.ttl_s != 900 else 600)
    for name in ("on_hand", "safety_stock", "delta"):
        if hasattr(command, name):
            return dataclasses.replace(command, **{name: getattr(command, name) + 1})
    return dataclasses.replace(command, reservation_id=command.reservation_id + "0")


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveWithNote:
    """Reserve as a later release might declare it: one more field, with a default."""

    merchant_id: str
    idempotency_key: str
    lines: tuple[Line, ...]
    ttl_s: int
    now_ms: int
    note: str = ""


def test_a_field_added_with_a_default_changes_no_fingerprint_and_no_encoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = next(r.command for r in records() if isinstance(r.command, Reserve))
    row = registry.BY_NAME["reserve"]
    widened = dataclasses.replace(row, type=ReserveWithNote)  # type: ignore[arg-type]
    monkeypatch.setitem(registry.BY_NAME, "reserve", widened)
    monkeypatch.setitem(registry.BY_TYPE, ReserveWithNote, widened)
    new = ReserveWithNote(old.merchant_id, old.idempotency_key, old.lines, old.ttl_s, old.now_ms)
    assert fingerprint(new) == fingerprint(old)  # type: ignore[arg-type]
    assert registry.command_to_data(new) == registry.command_to_data(old)  # type: ignore[arg-type]
    # An old record decodes into the new shape with the default.
    decoded = registry.command_from_data(registry.command_to_data(old))
    assert decoded == new
    # A value other than the default is part of the payload.
    noted = dataclasses.replace(new, note="leave at the door")
    assert fingerprint(noted) != fingerprint(old)  # type: ignore[arg-type]
    assert (
        dataclass_codec(ReserveWithNote).decode(dataclass_codec(ReserveWithNote).encode(noted))
        == noted
    )


def test_old_idempotency_entries_decode_with_today_s_codec() -> None:
    for stored in load("checkpoint.json")["idempotency"]:
        body = stored["body"] | {
            "merchant_id": stored["merchant_id"],
            "idempotency_key": stored["idempotency_key"],
        }
        entry = TABLES["idempotency"].row_from_data(body)
        assert isinstance(entry, IdempotencyEntry)
        # Written again today, defaults are left out; it still reads back as the same answer.
        again = TABLES["idempotency"].row_to_data(entry)
        assert TABLES["idempotency"].row_from_data(again) == entry
        assert outcome_from_data(again["outcome"]) == outcome_from_data(body["outcome"])
