"""The client's exceptions, built from a call's google.rpc.Status.

    InventoryError            any failed call: .code (grpc.StatusCode), .status (google.rpc)
    ├── InvalidArgument       .field, .reason                           INVALID_ARGUMENT
    ├── InsufficientStock     .lines: ShortLine(key, requested, available)  FAILED_PRECONDITION
    ├── ReservationNotFound   .reservation_id                           NOT_FOUND
    ├── ReservationNotActive  .reservation_id, .state, .changed_at_ms   FAILED_PRECONDITION
    ├── VersionMismatch       .key, .expected_version, .current_version ABORTED
    ├── IdempotencyKeyReused  .idempotency_key, .original_kind          ALREADY_EXISTS
    ├── CapacityExhausted     .limit_name, .limit                       RESOURCE_EXHAUSTED
    ├── Overloaded            load shed: this process's pending queue, or the server
    ├── Unavailable           still UNAVAILABLE after retry_attempts_max: .attempts
    └── DeadlineExceeded      the call's deadline passed

The first seven are the domain rejections of ``inventory_core``, read from the status by
``shard_router.common.errors.rejection_from_status`` (the one table, both ways); each carries
the rejection's fields and the rejection itself (``.rejection``). A rejection means nothing
was applied. ``Unavailable`` and ``DeadlineExceeded`` mean the outcome is unknown: the call may
or may not have been applied, and a retry with the same idempotency key finds out. Any other
status (INTERNAL, UNIMPLEMENTED, ...) is raised as a plain ``InventoryError``.
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

import inventory_core as core

from ..common import errors

_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_code(status: status_pb2.Status) -> grpc.StatusCode:
    return _CODES_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)


class InventoryError(Exception):
    """A call failed; ``status`` is the google.rpc.Status it failed with."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(f"{status_code(status).name}: {status.message}")
        self.status = status

    @property
    def code(self) -> grpc.StatusCode:
        return status_code(self.status)


class _Rejected(InventoryError):
    def __init__(self, status: status_pb2.Status, rejection: core.Rejection) -> None:
        super().__init__(status)
        self.rejection = rejection


class InvalidArgument(_Rejected):
    def __init__(self, status: status_pb2.Status, rejection: core.Invalid) -> None:
        super().__init__(status, rejection)
        self.field = rejection.field
        self.reason = rejection.reason


class InsufficientStock(_Rejected):
    """Nothing was reserved; ``lines`` has every line, with what was available for it."""

    def __init__(self, status: status_pb2.Status, rejection: core.InsufficientStock) -> None:
        super().__init__(status, rejection)
        self.lines: tuple[core.ShortLine, ...] = rejection.lines


class ReservationNotFound(_Rejected):
    def __init__(self, status: status_pb2.Status, rejection: core.ReservationNotFound) -> None:
        super().__init__(status, rejection)
        self.reservation_id = rejection.reservation_id


class ReservationNotActive(_Rejected):
    def __init__(self, status: status_pb2.Status, rejection: core.ReservationNotActive) -> None:
        super().__init__(status, rejection)
        self.reservation_id = rejection.reservation_id
        self.state: core.ReservationState = rejection.state
        self.changed_at_ms = rejection.state_changed_at_ms


class VersionMismatch(_Rejected):
    def __init__(self, status: status_pb2.Status, rejection: core.VersionMismatch) -> None:
        super().__init__(status, rejection)
        self.key: core.InventoryKey = rejection.key
        self.expected_version = rejection.expected_version
        self.current_version = rejection.current_version


class IdempotencyKeyReused(_Rejected):
    def __init__(self, status: status_pb2.Status, rejection: core.IdempotencyKeyReused) -> None:
        super().__init__(status, rejection)
        self.idempotency_key = rejection.idempotency_key
        self.original_kind = rejection.original_kind


class CapacityExhausted(_Rejected):
    def __init__(self, status: status_pb2.Status, rejection: core.CapacityExhausted) -> None:
        super().__init__(status, rejection)
        self.limit_name = rejection.limit_name
        self.limit = rejection.limit


class Overloaded(InventoryError):
    """Load was shed before the call was applied: by a full pending queue in this process
    (raised at once, never retried) or by the server (RESOURCE_EXHAUSTED without a named
    capacity). Back off at the caller's level."""

    @staticmethod
    def pending_items_full(pending_items_max: int) -> Overloaded:
        message = f"pending_items_max ({pending_items_max}) items already wait on this stream"
        return Overloaded(errors.status(grpc.StatusCode.RESOURCE_EXHAUSTED, message))


class Unavailable(InventoryError):
    """Still UNAVAILABLE after ``attempts`` tries; the outcome is unknown."""

    def __init__(self, status: status_pb2.Status, attempts: int) -> None:
        super().__init__(status)
        self.attempts = attempts


class DeadlineExceeded(InventoryError):
    """The call's deadline passed. If the server said so, nothing was applied; if the client
    gave up waiting (or was still retrying), the outcome is unknown."""


def error_from_status(status: status_pb2.Status) -> InventoryError:
    """The precise exception for a failed call's status (never for UNAVAILABLE retries)."""
    match errors.rejection_from_status(status):
        case core.Invalid() as rejection:
            return InvalidArgument(status, rejection)
        case core.InsufficientStock() as rejection:
            return InsufficientStock(status, rejection)
        case core.ReservationNotFound() as rejection:
            return ReservationNotFound(status, rejection)
        case core.ReservationNotActive() as rejection:
            return ReservationNotActive(status, rejection)
        case core.VersionMismatch() as rejection:
            return VersionMismatch(status, rejection)
        case core.IdempotencyKeyReused() as rejection:
            return IdempotencyKeyReused(status, rejection)
        case core.CapacityExhausted() as rejection:
            return CapacityExhausted(status, rejection)
        case None:
            return _transport_error(status)


def _transport_error(status: status_pb2.Status) -> InventoryError:
    match status_code(status):
        case grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(status)
        case grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(status)
        case grpc.StatusCode.UNAVAILABLE:
            return Unavailable(status, attempts=1)
        case _:
            return InventoryError(status)
