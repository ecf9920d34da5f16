"""The client's exceptions, built from a call's google.rpc.Status, by its answer class.

    InventoryError              any failed call: .code .status .answer_class .attempts
                                .error_reason (the ErrorInfo reason, e.g. NOT_OWNER)
    ├── InvalidArgument         .field, .reason                              INVALID_ARGUMENT
    ├── InsufficientStock       .lines: ShortLine(key, requested, available) FAILED_PRECONDITION
    ├── ReservationNotFound     .reservation_id                              NOT_FOUND
    ├── ReservationNotActive    .reservation_id, .state, .changed_at_ms      FAILED_PRECONDITION
    ├── VersionMismatch         .key, .expected_version, .current_version    ABORTED
    ├── IdempotencyKeyReused    .idempotency_key, .original_kind             ALREADY_EXISTS
    ├── CapacityExhausted       .limit_name, .limit                          RESOURCE_EXHAUSTED
    ├── SplitConflict           .key, .reason (a hot key's admin calls)      FAILED_PRECONDITION
    ├── NotApplied              retryable: the server knows nothing was applied
    │   └── Overloaded          load shed, by this process's pending queue or the server
    └── OutcomeUnknown          it may have been applied: retry with the same idempotency key
        ├── Unavailable         UNAVAILABLE (broken stream, failed flush, transport) at give-up
        └── DeadlineExceeded    the deadline passed with no definite answer

Every answer is one of three classes (``AnswerClass``, DESIGN section 11), and the class is
the caller's next step:

- **final**: the caller has its answer. The eight rejections of ``inventory_core`` (read by
  ``shard_router.common.errors.rejection_from_status``, the one table both ways; each carries
  its fields and ``.rejection``) applied nothing; sending the same request again gets the same
  answer. Any other final status (UNIMPLEMENTED, PERMISSION_DENIED, ...) is a plain
  ``InventoryError``.
- **retryable** (``NotApplied``): nothing was applied and the server knows it (not the
  owner, a partition recovering, load shed, the work's deadline passed before the owner
  applied it; ``.code`` and ``.error_reason`` say which), or the call is a read, which
  applies nothing whatever happened. Trying again later, here or elsewhere, is safe. The
  client has already retried as far as its attempts and the call's deadline allowed.
- **outcome unknown** (``OutcomeUnknown``): a mutation that may or may not have been applied
  (a flush whose result is unknown, a stream that broke with the call on it, the caller's
  deadline firing before an answer came: the server may still apply it). Retry with the same
  request, so the same idempotency key: the server answers a retry of an applied call with
  its original answer, and applies it once if it was not.

So ``except DeadlineExceeded`` catches the deadlines of unknown outcome; a deadline the
server says passed before anything was applied (or a read's) is ``NotApplied`` with
``.code`` DEADLINE_EXCEEDED. Likewise for ``Unavailable`` and UNAVAILABLE.

A give-up after several attempts is ``OutcomeUnknown`` if *any* attempt's outcome was unknown
(an earlier attempt may have been applied, whatever the last one said), else ``NotApplied``:
the client never reports "nothing applied" for work that might have been.
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

import inventory_core as core

from ..common import errors
from ..common.errors import AnswerClass, answer_class_of

_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_code(status: status_pb2.Status) -> grpc.StatusCode:
    return _CODES_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)


class InventoryError(Exception):
    """A call failed after ``attempts`` tries; ``status`` is the last one's google.rpc.Status.

    ``answer_class`` is the call's class, fixed by the exception's type (a plain
    ``InventoryError`` is final). It can differ from the last status's own class: when an
    earlier attempt's outcome was unknown, the call's is unknown whatever the last said.
    """

    answer_class = AnswerClass.FINAL
    # What the class means for the caller's next step, appended to the message.
    _advice = ""

    def __init__(self, status: status_pb2.Status, attempts: int = 1, note: str = "") -> None:
        assert attempts >= 1, attempts
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        text = f"{status_code(status).name}: {status.message}{note}{tries}{self._advice}"
        super().__init__(text)
        self.status = status
        self.attempts = attempts

    @property
    def code(self) -> grpc.StatusCode:
        return status_code(self.status)

    @property
    def error_reason(self) -> str | None:
        """The ErrorInfo reason of the inventory.v1 domain, if the status has one."""
        return errors.reason_of(self.status)


class _Rejected(InventoryError):
    """A domain rejection of the core: final, nothing was applied."""

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


class SplitConflict(_Rejected):
    """A hot key's split does not allow the call (an admin's or the rebalancer's)."""

    def __init__(self, status: status_pb2.Status, rejection: core.SplitConflict) -> None:
        super().__init__(status, rejection)
        self.key: core.InventoryKey = rejection.key
        self.reason = rejection.reason


class NotApplied(InventoryError):
    """Retryable: the server knows nothing was applied (``.code`` and ``.reason`` say why).

    Trying again later, on this address or another, is safe; the client's own retries (its
    attempts, within the call's deadline) are used up."""

    answer_class = AnswerClass.RETRYABLE
    _advice = "; nothing was applied, trying again is safe"


class Overloaded(NotApplied):
    """Load was shed before the call was applied: by a full pending queue in this process
    (raised at once, never retried) or by the server (RESOURCE_EXHAUSTED without a named
    capacity). Back off at the caller's level."""

    @staticmethod
    def pending_items_full(pending_items_max: int) -> Overloaded:
        message = f"pending_items_max ({pending_items_max}) items already wait on this stream"
        return Overloaded(errors.overloaded(message))


class OutcomeUnknown(InventoryError):
    """It may have been applied, or not. Retry with the same idempotency key (the same
    request) to learn which: an applied call is answered with its original answer, one that
    was not is applied once."""

    answer_class = AnswerClass.OUTCOME_UNKNOWN
    _advice = (
        "; outcome unknown: it may have been applied, retry with the same idempotency key"
        " to learn which"
    )


class Unavailable(OutcomeUnknown):
    """UNAVAILABLE with an unknown outcome (a broken stream, a flush whose result is unknown,
    a transport failure), still so after ``attempts`` tries."""


class DeadlineExceeded(OutcomeUnknown):
    """The deadline passed before a definite answer: the caller's deadline fired (gRPC answers
    DEADLINE_EXCEEDED locally), or the client stopped retrying after an attempt of unknown
    outcome. The server may still apply the work; retry with the same idempotency key."""


def error_from_status(status: status_pb2.Status, attempts: int = 1) -> InventoryError:
    """The precise exception for a failed call's status, by its answer class."""
    match answer_class_of(status):
        case AnswerClass.FINAL:
            return _final(status)
        case AnswerClass.RETRYABLE:
            return not_applied(status, attempts)
        case AnswerClass.OUTCOME_UNKNOWN:
            return outcome_unknown(status, attempts)


def not_applied(status: status_pb2.Status, attempts: int) -> NotApplied:
    if status_code(status) == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(status, attempts)
    return NotApplied(status, attempts)


def outcome_unknown(status: status_pb2.Status, attempts: int, note: str = "") -> OutcomeUnknown:
    match status_code(status):
        case grpc.StatusCode.UNAVAILABLE:
            return Unavailable(status, attempts, note)
        case grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(status, attempts, note)
        case _:
            return OutcomeUnknown(status, attempts, note)


def given_up(
    last: status_pb2.Status, attempts: int, *, unknown_seen: bool, deadline_passed: bool = False
) -> NotApplied | OutcomeUnknown:
    """What the caller gets when the client stops retrying after ``attempts`` tries, the
    last answered ``last``: outcome unknown if any attempt's was (``unknown_seen``, counted
    for mutations only), else not applied."""
    if deadline_passed and status_code(last) != grpc.StatusCode.DEADLINE_EXCEEDED:
        what = "an attempt's outcome was unknown" if unknown_seen else "no attempt was applied"
        message = f"the call's deadline passed while retrying; {what} (last: {last.message})"
        last = (
            errors.deadline_passed(message, mutating=True)
            if unknown_seen
            else errors.deadline_not_applied(message)
        )
    if not unknown_seen:
        return not_applied(last, attempts)
    return outcome_unknown(errors.after_attempts(last, earlier_unknown=True), attempts)


def _final(status: status_pb2.Status) -> InventoryError:
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
        case core.SplitConflict() as rejection:
            return SplitConflict(status, rejection)
        case None:
            return InventoryError(status)
