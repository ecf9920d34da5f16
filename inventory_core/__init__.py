"""The pure core: every stock rule of one partition, deterministic and free of IO.

No sockets, no event loop, no clock, no randomness: time arrives inside commands, and the
caller does the IO. The public surface is exactly ``__all__`` (tests/core/test_surface.py).

    partition = Partition(partition_of(merchant_id, location_id))
    step = partition.apply(Reserve(..., now_ms=...))
    # flush step.records durably, then reply with step.outcome, then publish step.events

The layout: ``_partition.py`` orders apply and replay; ``_registry.py`` has one row per
command kind; ``rules/`` holds the handlers by capability; ``_state.py`` the tables and the
invariants; ``_tables.py``, ``_checkpoint.py``, ``_expiry.py`` and ``_idempotency.py`` the
mechanisms; ``_codec.py`` the plain-data forms; ``orders.py`` multi-location order plans.
"""

from __future__ import annotations

from . import _limits as limits
from ._checkpoint import CheckpointDelta
from ._codec import (
    canonical_bytes,
    event_from_data,
    event_to_data,
    key_from_data,
    key_to_data,
    outcome_from_data,
    outcome_to_data,
    reservation_from_data,
    reservation_to_data,
    row_from_data,
    row_to_data,
)
from ._commands import (
    AdjustStock,
    ClientCommand,
    Command,
    Commit,
    Expire,
    Extend,
    FeedEvent,
    Ingest,
    KeyedCommand,
    Release,
    Reserve,
    SetSafetyStock,
    SetStock,
)
from ._idempotency import IdempotencyEntry
from ._model import (
    PARTITION_COUNT,
    AdjustmentReason,
    AvailabilityChanged,
    ChangeReason,
    FeedEventKind,
    InventoryKey,
    Line,
    Reservation,
    ReservationState,
    StockLevel,
    StockRow,
    partition_of,
    partition_of_reservation,
    reservation_id_for,
)
from ._outcomes import (
    Accepted,
    AckStatus,
    CapacityExhausted,
    Committed,
    EventAck,
    Expired,
    Extended,
    IdempotencyKeyReused,
    Ingested,
    InsufficientStock,
    Invalid,
    Outcome,
    OverCommit,
    OverCommitted,
    Rejection,
    Released,
    ReservationNotActive,
    ReservationNotFound,
    Reserved,
    ShortLine,
    StockChanged,
    VersionMismatch,
    is_accepted,
)
from ._partition import Partition, PartitionSnapshot, Record, Step, fingerprint
from ._registry import REGISTRY, CommandKind, command_from_data, command_to_data, kind_of, validate
from ._state import TABLES
from ._tables import TableDelta, TableSchema
from ._usage import ProcessUsage
from ._validate import (
    validate_feed_event,
    validate_feed_key,
    validate_identifier,
    validate_ingest_request,
    validate_key,
    validate_read,
    validate_watch_filter,
)

__all__ = [
    "PARTITION_COUNT",
    "REGISTRY",
    "TABLES",
    "Accepted",
    "AckStatus",
    "AdjustStock",
    "AdjustmentReason",
    "AvailabilityChanged",
    "CapacityExhausted",
    "ChangeReason",
    "CheckpointDelta",
    "ClientCommand",
    "Command",
    "CommandKind",
    "Commit",
    "Committed",
    "EventAck",
    "Expire",
    "Expired",
    "Extend",
    "Extended",
    "FeedEvent",
    "FeedEventKind",
    "IdempotencyEntry",
    "IdempotencyKeyReused",
    "Ingest",
    "Ingested",
    "InsufficientStock",
    "Invalid",
    "InventoryKey",
    "KeyedCommand",
    "Line",
    "Outcome",
    "OverCommit",
    "OverCommitted",
    "Partition",
    "PartitionSnapshot",
    "ProcessUsage",
    "Record",
    "Rejection",
    "Release",
    "Released",
    "Reservation",
    "ReservationNotActive",
    "ReservationNotFound",
    "ReservationState",
    "Reserve",
    "Reserved",
    "SetSafetyStock",
    "SetStock",
    "ShortLine",
    "Step",
    "StockChanged",
    "StockLevel",
    "StockRow",
    "TableDelta",
    "TableSchema",
    "VersionMismatch",
    "canonical_bytes",
    "command_from_data",
    "command_to_data",
    "event_from_data",
    "event_to_data",
    "fingerprint",
    "is_accepted",
    "key_from_data",
    "key_to_data",
    "kind_of",
    "limits",
    "outcome_from_data",
    "outcome_to_data",
    "partition_of",
    "partition_of_reservation",
    "reservation_from_data",
    "reservation_id_for",
    "reservation_to_data",
    "row_from_data",
    "row_to_data",
    "validate",
    "validate_feed_event",
    "validate_feed_key",
    "validate_identifier",
    "validate_ingest_request",
    "validate_key",
    "validate_read",
    "validate_watch_filter",
]
