"""The one table from core rejections to gRPC status codes and google.rpc details, both ways.

    rejection_to_status(rejection) -> google.rpc.Status     (servers)
    rejection_from_status(status)  -> Rejection | None       (clients, tests)

Each status carries a ``google.rpc.ErrorInfo`` (reason = the rejection's name, domain
``inventory.v1``) and the typed detail of errors.proto or google.rpc.BadRequest. Both
directions are tested against each other for every rejection (tests/test_errors.py).
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from inventory.v1 import errors_pb2

from inventory_core import (
    CapacityExhausted,
    IdempotencyKeyReused,
    InsufficientStock,
    Invalid,
    Rejection,
    ReservationNotActive,
    ReservationNotFound,
    ShortLine,
    VersionMismatch,
)

from . import convert

DOMAIN = "inventory.v1"
_M = TypeVar("_M")

# The table: rejection type -> (status code, ErrorInfo reason).
CODES: dict[type[Rejection], tuple[grpc.StatusCode, str]] = {
    Invalid: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    IdempotencyKeyReused: (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
    CapacityExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED"),
    ReservationNotFound: (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"),
    ReservationNotActive: (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_ACTIVE"),
    VersionMismatch: (grpc.StatusCode.ABORTED, "VERSION_MISMATCH"),
    InsufficientStock: (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK"),
}
REASONS = {reason: kind for kind, (_, reason) in CODES.items()}
# ErrorInfo reason of a redirect: the partition lives elsewhere, or is being recovered.
NOT_OWNER = "NOT_OWNER"


def rejection_to_status(rejection: Rejection) -> status_pb2.Status:
    code, reason = CODES[type(rejection)]
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
    return status(code, _message(rejection), info, _detail(rejection))


def status(code: grpc.StatusCode, message: str, *details: object) -> status_pb2.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)  # type: ignore[arg-type]
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def not_owner_status(partition: int, message: str) -> status_pb2.Status:
    """UNAVAILABLE, retryable: this process does not own the partition (now)."""
    info = error_details_pb2.ErrorInfo(
        reason=NOT_OWNER, domain=DOMAIN, metadata={"partition": str(partition)}
    )
    return status(grpc.StatusCode.UNAVAILABLE, message, info)


def _message(rejection: Rejection) -> str:
    match rejection:
        case Invalid(field, reason):
            return f"{field}: {reason}"
        case IdempotencyKeyReused(key, kind):
            return f"idempotency key {key!r} was used for another {kind} request"
        case CapacityExhausted(name, limit):
            return f"{name} ({limit}) reached"
        case ReservationNotFound(reservation_id):
            return f"reservation {reservation_id!r} not found"
        case ReservationNotActive(reservation_id, state, changed_at_ms):
            return f"reservation {reservation_id!r} is {state.value} since {changed_at_ms}"
        case VersionMismatch(key, expected, current):
            return f"version of {convert.key_text(key)} is {current}, expected {expected}"
        case InsufficientStock(lines):
            short = [line for line in lines if line.requested > line.available]
            return "insufficient stock: " + ", ".join(
                f"{convert.key_text(s.key)} requested {s.requested} available {s.available}"
                for s in short
            )


def _detail(rejection: Rejection) -> object:
    match rejection:
        case Invalid(field, reason):
            violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=reason)
            return error_details_pb2.BadRequest(field_violations=[violation])
        case IdempotencyKeyReused(key, kind):
            return errors_pb2.IdempotencyKeyReused(idempotency_key=key, original_kind=kind)
        case CapacityExhausted(name, limit):
            return errors_pb2.CapacityExhausted(limit_name=name, limit=limit)
        case ReservationNotFound(reservation_id):
            return error_details_pb2.ResourceInfo(
                resource_type="inventory.v1.Reservation", resource_name=reservation_id
            )
        case ReservationNotActive(reservation_id, state, changed_at_ms):
            return errors_pb2.ReservationNotActive(
                reservation_id=reservation_id,
                state=convert.STATE_TO_PROTO[state],
                state_changed_at_ms=changed_at_ms,
            )
        case VersionMismatch(key, expected, current):
            return errors_pb2.VersionMismatch(
                key=convert.key_to_proto(key), expected_version=expected, current_version=current
            )
        case InsufficientStock(lines):
            return errors_pb2.InsufficientStock(
                lines=[
                    errors_pb2.InsufficientStock.Line(
                        key=convert.key_to_proto(s.key),
                        requested=s.requested,
                        available=s.available,
                    )
                    for s in lines
                ]
            )


def rejection_from_status(status_message: status_pb2.Status) -> Rejection | None:
    """The core rejection a status stands for, or None for a transport or server error."""
    reason = None
    typed: dict[str, any_pb2.Any] = {}
    for detail in status_message.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                reason = info.reason
        else:
            typed[detail.TypeName()] = detail
    kind = REASONS.get(reason or "")
    if kind is None:
        return None
    return _from_detail(kind, typed)


def _unpack(typed: dict[str, any_pb2.Any], message: _M) -> _M:
    detail = typed[message.DESCRIPTOR.full_name]  # type: ignore[attr-defined]
    detail.Unpack(message)  # type: ignore[arg-type]
    return message


def _from_detail(kind: type[Rejection], typed: dict[str, any_pb2.Any]) -> Rejection:
    if kind is Invalid:
        violation = _unpack(typed, error_details_pb2.BadRequest()).field_violations[0]
        return Invalid(violation.field, violation.description)
    if kind is IdempotencyKeyReused:
        reused = _unpack(typed, errors_pb2.IdempotencyKeyReused())
        return IdempotencyKeyReused(reused.idempotency_key, reused.original_kind)
    if kind is CapacityExhausted:
        capacity = _unpack(typed, errors_pb2.CapacityExhausted())
        return CapacityExhausted(capacity.limit_name, capacity.limit)
    if kind is ReservationNotFound:
        return ReservationNotFound(_unpack(typed, error_details_pb2.ResourceInfo()).resource_name)
    if kind is ReservationNotActive:
        inactive = _unpack(typed, errors_pb2.ReservationNotActive())
        return ReservationNotActive(
            inactive.reservation_id,
            convert.STATE_FROM_PROTO[inactive.state],
            inactive.state_changed_at_ms,
        )
    if kind is VersionMismatch:
        mismatch = _unpack(typed, errors_pb2.VersionMismatch())
        return VersionMismatch(
            convert.key_from_proto(mismatch.key),
            mismatch.expected_version,
            mismatch.current_version,
        )
    short = _unpack(typed, errors_pb2.InsufficientStock())
    return InsufficientStock(
        tuple(
            ShortLine(convert.key_from_proto(line.key), line.requested, line.available)
            for line in short.lines
        )
    )
