"""One row per command kind: its name, its type, its validator and its handler.

A row may also say how its record is kept (``to_record``: the command to log for an
accepted outcome, or None to log nothing) and whether its answers are remembered by
idempotency key (``remembered``; a feed's events are de-duplicated one by one instead).

Apply, replay, validation, the ledger encoding and the idempotency fingerprint all dispatch
through this table, so a new command is a rules module and one row here; its codec is
derived from its dataclass fields (``_codec.py``). ``name`` is what the ledger's ``kind``
column and every record's ``"kind"`` field hold: it never changes once records exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from . import _validate
from ._codec import Data, DataclassCodec, dataclass_codec
from ._commands import (
    AdjustStock,
    Command,
    Commit,
    ExpectDelivery,
    Expire,
    Extend,
    Ingest,
    MarkStale,
    MergeKey,
    ReceiveQuota,
    Release,
    Reserve,
    SendQuota,
    SetSafetyStock,
    SetStock,
    SettleTransfer,
    SplitKey,
)
from ._outcomes import (
    Ingested,
    InsufficientStock,
    Invalid,
    MarkedStale,
    Outcome,
    TransferSettled,
)
from ._state import Effects, PartitionState
from .rules import buckets, counts, deliveries, feeds, reservations, staleness

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class CommandKind(Generic[C]):
    name: str
    type: type[C]
    validate: Callable[[C], Invalid | None]
    handle: Callable[[PartitionState, C, Effects], Outcome]
    # Sent by callers, scoped by merchant and idempotency key (not Expire).
    from_caller: bool = True
    # Its answer is remembered under (merchant_id, idempotency_key) for retries.
    remembered: bool = True
    # What an accepted outcome logs: the command itself unless this says otherwise.
    to_record: Callable[[C, Any], C | None] | None = None
    # The work a command is, in units of a one-line request (what bounds a shell's batch):
    # 1 unless this says otherwise.
    units: Callable[[C], int] | None = None
    # A refusal to record and remember like an answer (the command is logged as it is):
    # none unless this says so.
    keeps: Callable[[C, Outcome], bool] | None = None

    def keeps_refusal(self, command: C, outcome: Outcome) -> bool:
        return self.keeps is not None and self.keeps(command, outcome)

    def record_of(self, command: C, outcome: Outcome) -> C | None:
        return command if self.to_record is None else self.to_record(command, outcome)

    @property
    def codec(self) -> DataclassCodec[C]:
        return dataclass_codec(self.type)


def _ingest_record(command: Ingest, outcome: Ingested) -> Ingest | None:
    """Only the events it recorded (applied or superseded) and the heartbeat's locations it
    kept; nothing if there are none."""
    kept = feeds.recorded_events(command, outcome)
    if not kept and not outcome.alive_at:
        return None
    if len(kept) == len(command.events) and outcome.alive_at == command.alive_at:
        return command
    return replace(command, events=kept, alive_at=outcome.alive_at)


def _mark_stale_record(command: MarkStale, outcome: MarkedStale) -> MarkStale | None:
    """Only the locations it marked; nothing if none was still due."""
    if not outcome.locations:
        return None
    return (
        command
        if outcome.locations == command.locations
        else replace(command, locations=outcome.locations)
    )


def _settle_record(command: SettleTransfer, outcome: TransferSettled) -> SettleTransfer | None:
    """Nothing when the source had forgotten the transfer already."""
    return command if outcome.settled else None


REGISTRY: tuple[CommandKind[Any], ...] = (
    CommandKind(
        "reserve",
        Reserve,
        _validate.reserve,
        reservations.reserve,
        keeps=lambda command, outcome: (
            command.keep_refusal and isinstance(outcome, InsufficientStock)
        ),
    ),
    CommandKind("commit", Commit, _validate.commit, reservations.commit),
    CommandKind("release", Release, _validate.release, reservations.release),
    CommandKind("extend", Extend, _validate.extend, reservations.extend),
    CommandKind("adjust_stock", AdjustStock, _validate.adjust_stock, counts.adjust_stock),
    CommandKind("set_stock", SetStock, _validate.set_stock, counts.set_stock),
    CommandKind(
        "set_safety_stock", SetSafetyStock, _validate.set_safety_stock, counts.set_safety_stock
    ),
    CommandKind("expire", Expire, _validate.expire, reservations.expire, from_caller=False),
    CommandKind(
        "ingest",
        Ingest,
        _validate.ingest,
        feeds.ingest,
        remembered=False,
        to_record=_ingest_record,
        units=lambda command: max(len(command.events), 1),
    ),
    CommandKind(
        "expect_delivery",
        ExpectDelivery,
        _validate.expect_delivery,
        deliveries.expect_delivery,
        units=lambda command: max(len(command.lines), 1),
    ),
    CommandKind(
        "mark_stale",
        MarkStale,
        _validate.mark_stale,
        staleness.mark_stale,
        from_caller=False,
        remembered=False,
        to_record=_mark_stale_record,
    ),
    CommandKind("split_key", SplitKey, _validate.split_key, buckets.split_key),
    CommandKind("merge_key", MergeKey, _validate.merge_key, buckets.merge_key),
    CommandKind("send_quota", SendQuota, _validate.send_quota, buckets.send_quota),
    CommandKind(
        "receive_quota",
        ReceiveQuota,
        _validate.receive_quota,
        buckets.receive_quota,
        units=lambda command: max(len(command.transfer.consumed), 1),
    ),
    CommandKind(
        "settle_transfer",
        SettleTransfer,
        _validate.settle_transfer,
        buckets.settle_transfer,
        remembered=False,
        to_record=_settle_record,
    ),
)
BY_TYPE: dict[type[Any], CommandKind[Any]] = {row.type: row for row in REGISTRY}
BY_NAME: dict[str, CommandKind[Any]] = {row.name: row for row in REGISTRY}
assert len(BY_TYPE) == len(BY_NAME) == len(REGISTRY), "one row per kind and per name"


def kind_of(command: Command) -> str:
    return BY_TYPE[type(command)].name


def work_units(command: Command) -> int:
    """How much work a command is, in units of a one-line request: a feed's batch counts
    each of its events."""
    units = BY_TYPE[type(command)].units
    return 1 if units is None else units(command)


def validate(command: Command) -> Invalid | None:
    """The command's shape by its kind's rules: the field and the reason, or None."""
    problem: Invalid | None = BY_TYPE[type(command)].validate(command)
    return problem


def command_to_data(command: Command) -> Data:
    """Plain data of a command: ``{"kind": name, <fields>}`` (JSON-ready)."""
    return {"kind": kind_of(command)} | BY_TYPE[type(command)].codec.encode(command)


def command_from_data(data: Data) -> Command:
    """The inverse of ``command_to_data``; anything else is corruption (ValueError)."""
    row = BY_NAME.get(data.get("kind", ""))
    if row is None:
        raise ValueError(f"unknown record kind {data.get('kind')!r}")
    command: Command = row.codec.decode({k: v for k, v in data.items() if k != "kind"})
    return command
