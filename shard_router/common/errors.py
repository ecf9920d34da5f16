"""Every answer the service gives, in one table: gRPC code, ErrorInfo reason, detail, class.

    rejection_to_status(rejection) -> google.rpc.Status     core rejections (servers)
    rejection_from_status(status)  -> Rejection | None       (clients, tests)
    not_owner(...), overloaded(...), flush_failed(...) ...   the shell's outcomes
    answer_class_of(status)        -> AnswerClass            what a caller may conclude

Each answer has a class (Jepsen's ok / fail / info):

    FINAL            the caller has its answer (a rejection applied nothing; it is definite)
    RETRYABLE        nothing was applied, and the server knows it: try again, maybe elsewhere
    OUTCOME_UNKNOWN  it may have been applied: retry with the same idempotency key, which
                     finds the durable answer or runs the call afresh

Every status built here carries ``google.rpc.ErrorInfo(domain="inventory.v1", reason=...,
metadata={"answer_class": ..., ...})`` and, where the row names one, a typed detail of
errors.proto or google.rpc. A status without our ErrorInfo was not made by the service (gRPC
answers DEADLINE_EXCEEDED locally when a client's deadline fires, UNAVAILABLE when a
connection drops): ``answer_class_of`` then falls back by code, and every code that can mean
"maybe applied" reads OUTCOME_UNKNOWN. A read applies nothing, so where a mutation's outcome
would be unknown a read answers RETRYABLE.

``TABLE`` lists every row; tests/test_errors.py checks each both ways and pins the class of
every shell outcome, and that README's error section names every reason.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
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
    SplitConflict,
    VersionMismatch,
)

from . import convert

DOMAIN = "inventory.v1"
# The ErrorInfo metadata key holding the answer's class (an AnswerClass value).
ANSWER_CLASS_KEY = "answer_class"
_M = TypeVar("_M", bound=Message)


class AnswerClass(enum.Enum):
    FINAL = "final"
    RETRYABLE = "retryable"
    OUTCOME_UNKNOWN = "outcome_unknown"


FINAL = AnswerClass.FINAL
RETRYABLE = AnswerClass.RETRYABLE
OUTCOME_UNKNOWN = AnswerClass.OUTCOME_UNKNOWN


@dataclass(frozen=True, slots=True)
class Answer:
    """One row of the table."""

    reason: str  # ErrorInfo.reason
    code: grpc.StatusCode
    # The classes a status of this row can carry; most rows have exactly one.
    classes: tuple[AnswerClass, ...]
    # The typed detail next to ErrorInfo ("" for none), and extra ErrorInfo metadata keys.
    detail: str
    meaning: str


# ---------------------------------------------------------------------- the table

# Core rejections: final, and nothing was applied.
INVALID_ARGUMENT = Answer(
    "INVALID_ARGUMENT",
    grpc.StatusCode.INVALID_ARGUMENT,
    (FINAL,),
    "google.rpc.BadRequest",
    "malformed input; the violation names the field and the reason",
)
IDEMPOTENCY_KEY_REUSED = Answer(
    "IDEMPOTENCY_KEY_REUSED",
    grpc.StatusCode.ALREADY_EXISTS,
    (FINAL,),
    "IdempotencyKeyReused",
    "the idempotency key was used before for another payload",
)
CAPACITY_EXHAUSTED = Answer(
    "CAPACITY_EXHAUSTED",
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    (FINAL,),
    "CapacityExhausted",
    "a stated bound of the partition or the stream was reached",
)
RESERVATION_NOT_FOUND = Answer(
    "RESERVATION_NOT_FOUND",
    grpc.StatusCode.NOT_FOUND,
    (FINAL,),
    "google.rpc.ResourceInfo",
    "no such reservation for this merchant",
)
RESERVATION_NOT_ACTIVE = Answer(
    "RESERVATION_NOT_ACTIVE",
    grpc.StatusCode.FAILED_PRECONDITION,
    (FINAL,),
    "ReservationNotActive",
    "the reservation was committed, released or expired (its state and since when)",
)
VERSION_MISMATCH = Answer(
    "VERSION_MISMATCH",
    grpc.StatusCode.ABORTED,
    (FINAL,),
    "VersionMismatch",
    "expected_version did not match; the detail has the current one",
)
SPLIT_CONFLICT = Answer(
    "SPLIT_CONFLICT",
    grpc.StatusCode.FAILED_PRECONDITION,
    (FINAL,),
    "SplitConflict",
    "a hot key's split does not allow the call (the key and why)",
)
INSUFFICIENT_STOCK = Answer(
    "INSUFFICIENT_STOCK",
    grpc.StatusCode.FAILED_PRECONDITION,
    (FINAL,),
    "InsufficientStock",
    "not enough available; requested and available per line",
)
# The shell's outcomes.
ORDER_RELEASED = Answer(
    "ORDER_RELEASED",
    grpc.StatusCode.FAILED_PRECONDITION,
    (FINAL,),
    "metadata order_idempotency_key",
    "a retried ReserveOrder that failed before: its legs were released; order again with a new key",
)
UNIMPLEMENTED = Answer(
    "UNIMPLEMENTED",
    grpc.StatusCode.UNIMPLEMENTED,
    (FINAL,),
    "",
    "this process does not serve the call (ReserveOrder on a shard)",
)
UNAUTHENTICATED = Answer(
    "UNAUTHENTICATED",
    grpc.StatusCode.UNAUTHENTICATED,
    (FINAL,),
    "",
    "no token, or one that is expired, badly signed or signed by a key not accepted: "
    "nothing was applied; call again with a good token",
)
PERMISSION_DENIED = Answer(
    "PERMISSION_DENIED",
    grpc.StatusCode.PERMISSION_DENIED,
    (FINAL,),
    "",
    "the token's role may not make the call, or its scope does not hold the merchant: "
    "nothing was applied or read",
)
NOT_OWNER = Answer(
    "NOT_OWNER",
    grpc.StatusCode.UNAVAILABLE,
    (RETRYABLE,),
    "metadata partition",
    "this process does not own the partition (a redirect): refresh the ring and retry",
)
PARTITION_RECOVERING = Answer(
    "PARTITION_RECOVERING",
    grpc.StatusCode.UNAVAILABLE,
    (RETRYABLE,),
    "metadata partition",
    "the partition is reloading after a failed flush or a hand-off; retry shortly",
)
FENCED = Answer(
    "FENCED",
    grpc.StatusCode.UNAVAILABLE,
    (RETRYABLE,),
    "metadata partition",
    "the owner lost the partition: the flush's epoch check rolled it back, nothing applied",
)
OVERLOADED = Answer(
    "OVERLOADED",
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    (RETRYABLE,),
    "",
    "load shed (a full request queue) before the work was queued: back off",
)
DEADLINE_NOT_APPLIED = Answer(
    "DEADLINE_NOT_APPLIED",
    grpc.StatusCode.DEADLINE_EXCEEDED,
    (RETRYABLE,),
    "",
    "the deadline passed before the work was applied; the server knows nothing was applied",
)
DEADLINE_PASSED = Answer(
    "DEADLINE_PASSED",
    grpc.StatusCode.DEADLINE_EXCEEDED,
    (OUTCOME_UNKNOWN, RETRYABLE),
    "",
    "the deadline passed while waiting for an answer: a mutation may have been applied",
)
FLUSH_FAILED = Answer(
    "FLUSH_FAILED",
    grpc.StatusCode.UNAVAILABLE,
    (OUTCOME_UNKNOWN,),
    "metadata partitions",
    "the ledger flush failed or its outcome is unknown; the partition recovers",
)
OWNERS_UNAVAILABLE = Answer(
    "OWNERS_UNAVAILABLE",
    grpc.StatusCode.UNAVAILABLE,
    (RETRYABLE, OUTCOME_UNKNOWN),
    "",
    "no live owner answered after retries: retryable only if every attempt was known not applied",
)
STREAM_BROKEN = Answer(
    "STREAM_BROKEN",
    grpc.StatusCode.UNAVAILABLE,
    (OUTCOME_UNKNOWN, RETRYABLE),
    "",
    "the Batch stream broke: an item sent on it may have been applied, one never sent was not",
)
ORDER_OUTCOME_UNKNOWN = Answer(
    "ORDER_OUTCOME_UNKNOWN",
    grpc.StatusCode.UNAVAILABLE,
    (OUTCOME_UNKNOWN,),
    "metadata legs",
    "a ReserveOrder leg stayed unknown: retry the order with the same key to settle it",
)
SERVER_STOPPING = Answer(
    "SERVER_STOPPING",
    grpc.StatusCode.UNAVAILABLE,
    (RETRYABLE,),
    "",
    "the router is stopping: resume the Watch elsewhere with the last token",
)
INTERNAL = Answer(
    "INTERNAL",
    grpc.StatusCode.INTERNAL,
    (OUTCOME_UNKNOWN, RETRYABLE),
    "",
    "a bug in the service: a mutation may have been applied",
)

# Core rejection type -> its row.
REJECTIONS: dict[type[Rejection], Answer] = {
    Invalid: INVALID_ARGUMENT,
    IdempotencyKeyReused: IDEMPOTENCY_KEY_REUSED,
    CapacityExhausted: CAPACITY_EXHAUSTED,
    ReservationNotFound: RESERVATION_NOT_FOUND,
    ReservationNotActive: RESERVATION_NOT_ACTIVE,
    VersionMismatch: VERSION_MISMATCH,
    SplitConflict: SPLIT_CONFLICT,
    InsufficientStock: INSUFFICIENT_STOCK,
}
SHELL: tuple[Answer, ...] = (
    ORDER_RELEASED,
    UNIMPLEMENTED,
    UNAUTHENTICATED,
    PERMISSION_DENIED,
    NOT_OWNER,
    PARTITION_RECOVERING,
    FENCED,
    OVERLOADED,
    DEADLINE_NOT_APPLIED,
    DEADLINE_PASSED,
    FLUSH_FAILED,
    OWNERS_UNAVAILABLE,
    STREAM_BROKEN,
    ORDER_OUTCOME_UNKNOWN,
    SERVER_STOPPING,
    INTERNAL,
)
TABLE: tuple[Answer, ...] = (*REJECTIONS.values(), *SHELL)
BY_REASON: dict[str, Answer] = {answer.reason: answer for answer in TABLE}
# Compatibility views of the rejection rows: type -> (code, reason), reason -> type.
CODES: dict[type[Rejection], tuple[grpc.StatusCode, str]] = {
    kind: (answer.code, answer.reason) for kind, answer in REJECTIONS.items()
}
REASONS = {answer.reason: kind for kind, answer in REJECTIONS.items()}

# Without our ErrorInfo, these codes may mean the call was applied (a client deadline, a
# dropped connection, a proxy's error); every other code is read as final.
_UNKNOWN_WITHOUT_DETAIL = frozenset(
    code.value[0]
    for code in (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED,
    )
)


# ------------------------------------------------------------------ reading answers


def error_info_of(status_message: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    """Our ErrorInfo (domain inventory.v1) of a status, if it has one."""
    for detail in status_message.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                return info
    return None


def reason_of(status_message: status_pb2.Status) -> str | None:
    info = error_info_of(status_message)
    return None if info is None else info.reason


def answer_class_of(status_message: status_pb2.Status) -> AnswerClass:
    """What a caller may conclude from a failed call's status.

    Our ErrorInfo's ``answer_class`` when present (also from a newer server whose reason
    this table does not know), else the class of its row when that has only one, else by
    code: DEADLINE_EXCEEDED, UNAVAILABLE, CANCELLED, UNKNOWN, INTERNAL, DATA_LOSS and ABORTED
    are OUTCOME_UNKNOWN, everything else FINAL.
    """
    info = error_info_of(status_message)
    if info is not None:
        value = info.metadata.get(ANSWER_CLASS_KEY, "")
        if value in _CLASS_VALUES:
            return AnswerClass(value)
        row = BY_REASON.get(info.reason)
        if row is not None and len(row.classes) == 1:
            return row.classes[0]
    if status_message.code in _UNKNOWN_WITHOUT_DETAIL:
        return OUTCOME_UNKNOWN
    return FINAL


_CLASS_VALUES = frozenset(member.value for member in AnswerClass)


# -------------------------------------------------------------- building answers


def status(code: grpc.StatusCode, message: str, *details: Message) -> status_pb2.Status:
    """Pack a status. The service's answers are built by the constructors below, which add
    our ErrorInfo; this is for a status gRPC handed over without details (an AioRpcError)."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def answer(
    row: Answer,
    message: str,
    *details: Message,
    answer_class: AnswerClass | None = None,
    metadata: Mapping[str, str] | None = None,
) -> status_pb2.Status:
    """A status of ``row``; ``answer_class`` must be given when the row allows several."""
    if answer_class is None:
        assert len(row.classes) == 1, f"{row.reason} needs an answer_class"
        answer_class = row.classes[0]
    assert answer_class in row.classes, (row.reason, answer_class)
    info = error_details_pb2.ErrorInfo(
        reason=row.reason,
        domain=DOMAIN,
        metadata={ANSWER_CLASS_KEY: answer_class.value, **(metadata or {})},
    )
    return status(row.code, message, info, *details)


def rejection_to_status(rejection: Rejection) -> status_pb2.Status:
    return answer(REJECTIONS[type(rejection)], _message(rejection), _detail(rejection))


def not_owner(partition: int, message: str) -> status_pb2.Status:
    """UNAVAILABLE, retryable: this process does not own the partition (a redirect)."""
    return answer(NOT_OWNER, message, metadata={"partition": str(partition)})


def not_owner_status(partition: int, message: str) -> status_pb2.Status:
    """The former name of ``not_owner``."""
    return not_owner(partition, message)


def partition_recovering(partition: int, message: str) -> status_pb2.Status:
    return answer(PARTITION_RECOVERING, message, metadata={"partition": str(partition)})


def fenced(partition: int, message: str) -> status_pb2.Status:
    """The flush's transaction rolled back on the epoch check: nothing applied here."""
    return answer(FENCED, message, metadata={"partition": str(partition)})


def overloaded(message: str) -> status_pb2.Status:
    return answer(OVERLOADED, message)


def deadline_not_applied(message: str) -> status_pb2.Status:
    """The deadline passed before the work was applied, and the server knows it was not."""
    return answer(DEADLINE_NOT_APPLIED, message)


def deadline_passed(message: str, *, mutating: bool) -> status_pb2.Status:
    """The deadline passed while waiting: a mutation's outcome is unknown."""
    return answer(DEADLINE_PASSED, message, answer_class=_unknown_unless_read(mutating))


def flush_failed(message: str, partitions: Sequence[int] = ()) -> status_pb2.Status:
    metadata = {"partitions": ",".join(map(str, partitions))} if partitions else None
    return answer(FLUSH_FAILED, message, metadata=metadata)


def owners_unavailable(message: str, *, outcome_unknown: bool) -> status_pb2.Status:
    """No owner answered: unknown if any attempt of a mutation may have been applied."""
    answer_class = OUTCOME_UNKNOWN if outcome_unknown else RETRYABLE
    return answer(OWNERS_UNAVAILABLE, message, answer_class=answer_class)


def stream_broken(message: str, *, sent: bool, mutating: bool) -> status_pb2.Status:
    """A Batch stream broke: an item sent on it may have been applied, if it mutates."""
    answer_class = OUTCOME_UNKNOWN if sent and mutating else RETRYABLE
    return answer(STREAM_BROKEN, message, answer_class=answer_class)


def internal(message: str, *, mutating: bool) -> status_pb2.Status:
    return answer(INTERNAL, message, answer_class=_unknown_unless_read(mutating))


def unimplemented(message: str) -> status_pb2.Status:
    return answer(UNIMPLEMENTED, message)


def unauthenticated(message: str) -> status_pb2.Status:
    return answer(UNAUTHENTICATED, message)


def permission_denied(message: str) -> status_pb2.Status:
    return answer(PERMISSION_DENIED, message)


def order_released(order_idempotency_key: str) -> status_pb2.Status:
    message = (
        f"order {order_idempotency_key!r} failed before and its legs were released;"
        " place it again with a new idempotency key"
    )
    return answer(
        ORDER_RELEASED, message, metadata={"order_idempotency_key": order_idempotency_key}
    )


def order_outcome_unknown(
    order_idempotency_key: str, legs: Sequence[int], why: str
) -> status_pb2.Status:
    message = (
        f"order {order_idempotency_key!r}: the outcome of legs {list(legs)} is unknown ({why});"
        " retry the order with the same idempotency key"
    )
    return answer(ORDER_OUTCOME_UNKNOWN, message, metadata={"legs": ",".join(map(str, legs))})


def server_stopping(message: str) -> status_pb2.Status:
    return answer(SERVER_STOPPING, message)


def after_attempts(last: status_pb2.Status, *, earlier_unknown: bool) -> status_pb2.Status:
    """The answer to give after several attempts of one call ended with ``last``.

    A final answer stands (a retry with the same key finds the durable answer or runs the
    call afresh, so it is the truth). But "nothing applied" is only true of the last attempt:
    if an earlier one may have been applied, the call's outcome is unknown.
    """
    if not earlier_unknown or answer_class_of(last) is not RETRYABLE:
        return last
    message = f"{last.message}; an earlier attempt's outcome is unknown, retry with the same key"
    if last.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]:
        return deadline_passed(message, mutating=True)
    return owners_unavailable(message, outcome_unknown=True)


def _unknown_unless_read(mutating: bool) -> AnswerClass:
    return OUTCOME_UNKNOWN if mutating else RETRYABLE


# ------------------------------------------------------------------- rejections


def iso_utc(epoch_ms: int) -> str:
    """``2026-12-01T10:00:00.123Z`` for Unix epoch milliseconds: times in messages."""
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
        milliseconds=epoch_ms
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


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
            since = iso_utc(changed_at_ms)
            return f"reservation {reservation_id!r} is {state.value} since {since}"
        case VersionMismatch(key, expected, current):
            return f"version of {convert.key_text(key)} is {current}, expected {expected}"
        case SplitConflict(key, reason):
            return f"{convert.key_text(key)}: {reason}"
        case InsufficientStock(lines):
            short = [line for line in lines if line.requested > line.available]
            return "insufficient stock: " + ", ".join(
                f"{convert.key_text(s.key)} requested {s.requested} available {s.available}"
                for s in short
            )


def _detail(rejection: Rejection) -> Message:
    match rejection:
        case Invalid(field, reason):
            violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=reason)
            bad_request: Message = error_details_pb2.BadRequest(field_violations=[violation])
            return bad_request
        case IdempotencyKeyReused(key, kind):
            return errors_pb2.IdempotencyKeyReused(idempotency_key=key, original_kind=kind)
        case CapacityExhausted(name, limit):
            return errors_pb2.CapacityExhausted(limit_name=name, limit=limit)
        case ReservationNotFound(reservation_id):
            resource: Message = error_details_pb2.ResourceInfo(
                resource_type="inventory.v1.Reservation", resource_name=reservation_id
            )
            return resource
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
        case SplitConflict(key, reason):
            return errors_pb2.SplitConflict(key=convert.key_to_proto(key), reason=reason)
        case InsufficientStock(lines, kept):
            return errors_pb2.InsufficientStock(
                lines=[
                    errors_pb2.InsufficientStock.Line(
                        key=convert.key_to_proto(s.key),
                        requested=s.requested,
                        available=s.available,
                    )
                    for s in lines
                ],
                kept=kept,
            )


def rejection_from_status(status_message: status_pb2.Status) -> Rejection | None:
    """The core rejection a status stands for, or None for a shell outcome or transport error."""
    kind = REASONS.get(reason_of(status_message) or "")
    if kind is None:
        return None
    typed = {
        detail.TypeName(): detail
        for detail in status_message.details
        if not detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
    }
    return _from_detail(kind, typed)


def _unpack(typed: dict[str, any_pb2.Any], message: _M) -> _M:
    detail = typed[message.DESCRIPTOR.full_name]
    detail.Unpack(message)
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
    if kind is SplitConflict:
        conflict = _unpack(typed, errors_pb2.SplitConflict())
        return SplitConflict(convert.key_from_proto(conflict.key), conflict.reason)
    short = _unpack(typed, errors_pb2.InsufficientStock())
    return InsufficientStock(
        tuple(
            ShortLine(convert.key_from_proto(line.key), line.requested, line.available)
            for line in short.lines
        ),
        short.kept,
    )
