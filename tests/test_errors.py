"""The one table of answers, both ways: every core rejection and every shell outcome maps to
its gRPC code, ErrorInfo reason and class and back; every shell outcome's class is pinned;
a status the service did not make falls back by code. Also the one table of calls
(shard_router.common.rpcs) against the proto."""

from __future__ import annotations

import typing
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import (
    CapacityExhausted,
    IdempotencyKeyReused,
    InsufficientStock,
    Invalid,
    InventoryKey,
    Rejection,
    ReservationNotActive,
    ReservationNotFound,
    ReservationState,
    ShortLine,
    SplitConflict,
    VersionMismatch,
)
from shard_router.common import batching, errors, rpcs, servicer

KEY = InventoryKey("merchant-1", "sku-42", "loc-7")
OTHER_KEY = InventoryKey("merchant-1", "sku-43", "loc-7")

# At least one value per rejection type; several where a field has shapes worth covering.
EXAMPLES: list[Rejection] = [
    Invalid("lines[2].quantity", "must be between 1 and 1000000"),
    IdempotencyKeyReused("order-9:attempt-1:reserve", "reserve"),
    CapacityExhausted("reservations_live_max", 100_000),
    ReservationNotFound("r0003-0000000012"),
    *(
        ReservationNotActive("r0003-0000000012", state, 1_700_000_000_123)
        for state in ReservationState
    ),
    VersionMismatch(KEY, 3, 5),
    VersionMismatch(KEY, 0, 1),
    SplitConflict(KEY, "merging: its buckets get no more units"),
    InsufficientStock((ShortLine(KEY, 4, 1), ShortLine(OTHER_KEY, 2, 9))),
    InsufficientStock((ShortLine(KEY, 1, 0),)),
]


def _name(rejection: Rejection) -> str:
    return type(rejection).__name__


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, status
    return infos[0]


def test_table_covers_every_member_of_the_rejection_union() -> None:
    assert set(errors.CODES) == set(typing.get_args(Rejection))


def test_examples_cover_every_rejection_in_the_table() -> None:
    assert {type(example) for example in EXAMPLES} == set(errors.CODES)


def test_reasons_are_unique_so_each_status_maps_back_to_one_rejection() -> None:
    reasons = [reason for _, reason in errors.CODES.values()]
    assert len(set(reasons)) == len(reasons)


@pytest.mark.parametrize("rejection", EXAMPLES, ids=_name)
def test_rejection_survives_status_round_trip(rejection: Rejection) -> None:
    status = errors.rejection_to_status(rejection)
    wire = status_pb2.Status.FromString(status.SerializeToString())
    assert errors.rejection_from_status(wire) == rejection


@pytest.mark.parametrize("rejection", EXAMPLES, ids=_name)
def test_status_code_and_error_info_follow_the_table(rejection: Rejection) -> None:
    code, reason = errors.CODES[type(rejection)]
    status = errors.rejection_to_status(rejection)
    assert status.code == code.value[0]
    info = _error_info(status)
    assert (info.reason, info.domain) == (reason, errors.DOMAIN)
    assert status.message


def test_design_section_11_codes() -> None:
    expected = {
        Invalid: grpc.StatusCode.INVALID_ARGUMENT,
        InsufficientStock: grpc.StatusCode.FAILED_PRECONDITION,
        ReservationNotFound: grpc.StatusCode.NOT_FOUND,
        VersionMismatch: grpc.StatusCode.ABORTED,
        IdempotencyKeyReused: grpc.StatusCode.ALREADY_EXISTS,
        CapacityExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    for kind, code in expected.items():
        assert errors.CODES[kind][0] == code, kind


def test_status_without_any_detail_is_not_a_rejection() -> None:
    status = errors.status(grpc.StatusCode.UNAVAILABLE, "partition 3 is recovering")
    assert errors.rejection_from_status(status) is None


def test_status_with_error_info_of_another_domain_is_not_a_rejection() -> None:
    info = error_details_pb2.ErrorInfo(reason="INSUFFICIENT_STOCK", domain="googleapis.com")
    status = errors.status(grpc.StatusCode.FAILED_PRECONDITION, "elsewhere", info)
    assert errors.rejection_from_status(status) is None


def test_status_with_our_domain_but_unknown_reason_is_not_a_rejection() -> None:
    info = error_details_pb2.ErrorInfo(reason="SOMETHING_NEW", domain=errors.DOMAIN)
    status = errors.status(grpc.StatusCode.INTERNAL, "new server", info)
    assert errors.rejection_from_status(status) is None


def test_status_with_only_typed_detail_and_no_error_info_is_not_a_rejection() -> None:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ResourceInfo(resource_name="r0003-0000000012"))
    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], details=[detail])
    assert errors.rejection_from_status(status) is None


# ------------------------------------------------------------- the whole answer table

FINAL, RETRYABLE, UNKNOWN = (
    errors.AnswerClass.FINAL,
    errors.AnswerClass.RETRYABLE,
    errors.AnswerClass.OUTCOME_UNKNOWN,
)
ROW_CLASSES = [(row, answer_class) for row in errors.TABLE for answer_class in row.classes]


def test_reasons_of_the_whole_table_are_unique() -> None:
    reasons = [row.reason for row in errors.TABLE]
    assert len(set(reasons)) == len(reasons)
    assert set(errors.BY_REASON) == set(reasons)


def test_every_core_rejection_is_final() -> None:
    assert all(row.classes == (FINAL,) for row in errors.REJECTIONS.values())
    for rejection in EXAMPLES:
        assert errors.answer_class_of(errors.rejection_to_status(rejection)) is FINAL


@pytest.mark.parametrize(
    ("row", "answer_class"), ROW_CLASSES, ids=[f"{r.reason}-{c.value}" for r, c in ROW_CLASSES]
)
def test_every_row_maps_to_its_code_reason_and_class_and_back(
    row: errors.Answer, answer_class: errors.AnswerClass
) -> None:
    status = errors.answer(row, "what happened", answer_class=answer_class)
    wire = status_pb2.Status.FromString(status.SerializeToString())
    assert wire.code == row.code.value[0]
    info = _error_info(wire)
    assert (info.domain, info.reason) == (errors.DOMAIN, row.reason)
    assert info.metadata[errors.ANSWER_CLASS_KEY] == answer_class.value
    assert errors.answer_class_of(wire) is answer_class
    assert errors.BY_REASON[errors.reason_of(wire) or ""] is row


def test_a_row_refuses_a_class_it_does_not_allow() -> None:
    with pytest.raises(AssertionError):
        errors.answer(errors.NOT_OWNER, "x", answer_class=UNKNOWN)
    with pytest.raises(AssertionError):
        errors.answer(errors.OWNERS_UNAVAILABLE, "which class?")


# Every shell outcome, built by its constructor, with the class it must carry (pinned).
SHELL_OUTCOMES: list[tuple[str, status_pb2.Status, grpc.StatusCode, errors.AnswerClass]] = [
    ("not owner", errors.not_owner(3, "x"), grpc.StatusCode.UNAVAILABLE, RETRYABLE),
    ("recovering", errors.partition_recovering(3, "x"), grpc.StatusCode.UNAVAILABLE, RETRYABLE),
    ("fenced", errors.fenced(3, "x"), grpc.StatusCode.UNAVAILABLE, RETRYABLE),
    ("overloaded", errors.overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, RETRYABLE),
    (
        "deadline before applied",
        errors.deadline_not_applied("x"),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        RETRYABLE,
    ),
    (
        "deadline while waiting, mutation",
        errors.deadline_passed("x", mutating=True),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        UNKNOWN,
    ),
    (
        "deadline while waiting, read",
        errors.deadline_passed("x", mutating=False),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        RETRYABLE,
    ),
    ("flush failed", errors.flush_failed("x", [3]), grpc.StatusCode.UNAVAILABLE, UNKNOWN),
    (
        "owners unavailable, all known not applied",
        errors.owners_unavailable("x", outcome_unknown=False),
        grpc.StatusCode.UNAVAILABLE,
        RETRYABLE,
    ),
    (
        "owners unavailable, an attempt unknown",
        errors.owners_unavailable("x", outcome_unknown=True),
        grpc.StatusCode.UNAVAILABLE,
        UNKNOWN,
    ),
    (
        "stream broken, mutation sent",
        errors.stream_broken("x", sent=True, mutating=True),
        grpc.StatusCode.UNAVAILABLE,
        UNKNOWN,
    ),
    (
        "stream broken, never sent",
        errors.stream_broken("x", sent=False, mutating=True),
        grpc.StatusCode.UNAVAILABLE,
        RETRYABLE,
    ),
    (
        "stream broken, read",
        errors.stream_broken("x", sent=True, mutating=False),
        grpc.StatusCode.UNAVAILABLE,
        RETRYABLE,
    ),
    (
        "internal, mutation",
        errors.internal("x", mutating=True),
        grpc.StatusCode.INTERNAL,
        UNKNOWN,
    ),
    (
        "internal, read",
        errors.internal("x", mutating=False),
        grpc.StatusCode.INTERNAL,
        RETRYABLE,
    ),
    ("unimplemented", errors.unimplemented("x"), grpc.StatusCode.UNIMPLEMENTED, FINAL),
    ("unauthenticated", errors.unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED, FINAL),
    (
        "permission denied",
        errors.permission_denied("x"),
        grpc.StatusCode.PERMISSION_DENIED,
        FINAL,
    ),
    (
        "order released",
        errors.order_released("order-1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        FINAL,
    ),
    (
        "order unknown",
        errors.order_outcome_unknown("order-1", [1], "flush failed"),
        grpc.StatusCode.UNAVAILABLE,
        UNKNOWN,
    ),
    ("server stopping", errors.server_stopping("x"), grpc.StatusCode.UNAVAILABLE, RETRYABLE),
]


@pytest.mark.parametrize(
    ("name", "status", "code", "answer_class"), SHELL_OUTCOMES, ids=[o[0] for o in SHELL_OUTCOMES]
)
def test_every_shell_outcome_has_its_pinned_code_and_class(
    name: str, status: status_pb2.Status, code: grpc.StatusCode, answer_class: errors.AnswerClass
) -> None:
    assert status.code == code.value[0], name
    assert errors.answer_class_of(status) is answer_class, name
    assert errors.rejection_from_status(status) is None, "a shell outcome is no rejection"
    assert _error_info(status).domain == errors.DOMAIN


def test_the_pinned_outcomes_cover_every_shell_row() -> None:
    covered = {errors.reason_of(status) for _, status, _, _ in SHELL_OUTCOMES}
    assert covered == {row.reason for row in errors.SHELL}


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_a_status_without_our_error_info_falls_back_by_code(code: grpc.StatusCode) -> None:
    maybe_applied = {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED,
    }
    expected = UNKNOWN if code in maybe_applied else FINAL
    assert errors.answer_class_of(errors.status(code, "made by gRPC")) is expected
    foreign = error_details_pb2.ErrorInfo(
        reason="NOT_OWNER", domain="elsewhere", metadata={errors.ANSWER_CLASS_KEY: "retryable"}
    )
    assert errors.answer_class_of(errors.status(code, "another domain", foreign)) is expected


def test_answer_class_metadata_wins_even_for_a_reason_this_table_does_not_know() -> None:
    info = error_details_pb2.ErrorInfo(
        reason="SOMETHING_NEW",
        domain=errors.DOMAIN,
        metadata={errors.ANSWER_CLASS_KEY: "retryable"},
    )
    status = errors.status(grpc.StatusCode.UNAVAILABLE, "newer server", info)
    assert errors.answer_class_of(status) is RETRYABLE


def test_a_known_reason_without_class_metadata_gets_its_rows_class() -> None:
    info = error_details_pb2.ErrorInfo(reason="NOT_OWNER", domain=errors.DOMAIN)
    status = errors.status(grpc.StatusCode.UNAVAILABLE, "older server", info)
    assert errors.answer_class_of(status) is RETRYABLE
    two_classes = error_details_pb2.ErrorInfo(reason="STREAM_BROKEN", domain=errors.DOMAIN)
    status = errors.status(grpc.StatusCode.UNAVAILABLE, "older server", two_classes)
    assert errors.answer_class_of(status) is UNKNOWN  # by code


def test_after_attempts_never_reports_not_applied_when_an_earlier_attempt_may_have_been() -> None:
    not_applied = errors.deadline_not_applied("the last attempt was not applied")
    assert errors.after_attempts(not_applied, earlier_unknown=False) is not_applied
    honest = errors.after_attempts(not_applied, earlier_unknown=True)
    assert honest.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert errors.answer_class_of(honest) is UNKNOWN
    shed = errors.after_attempts(errors.overloaded("queue full"), earlier_unknown=True)
    assert errors.answer_class_of(shed) is UNKNOWN
    final = errors.rejection_to_status(ReservationNotFound("r0003-0000000012"))
    assert errors.after_attempts(final, earlier_unknown=True) is final  # the truth, by key


def test_times_in_messages_are_iso_8601_utc_while_the_detail_keeps_epoch_ms() -> None:
    changed_at_ms = 1_796_119_200_123  # 2026-12-01T10:00:00.123Z
    rejection = ReservationNotActive("r0003-0000000012", ReservationState.EXPIRED, changed_at_ms)
    status = errors.rejection_to_status(rejection)
    assert status.message == (
        "reservation 'r0003-0000000012' is expired since 2026-12-01T10:00:00.123Z"
    )
    assert errors.rejection_from_status(status) == rejection
    assert errors.iso_utc(0) == "1970-01-01T00:00:00.000Z"


def test_readme_and_proto_document_every_reason() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    proto = (root / "protos/inventory/v1/inventory.proto").read_text()
    for row in errors.TABLE:
        assert f"| {row.code.name} | `{row.reason}` |" in readme, row.reason
        assert row.reason in proto, row.reason


# ------------------------------------------------------------ the table of calls


def test_the_call_table_matches_the_proto_service_and_the_batch_item() -> None:
    served: dict[str, set[str]] = {
        rpcs.INVENTORY: {"Batch"},
        rpcs.INGEST_SERVICE: {"Stream"},
        rpcs.HOT_KEYS: set(),
    }
    for name, streaming in served.items():
        service = pb.DESCRIPTOR.services_by_name[name]
        unary = {m.name: m for m in service.methods if not m.client_streaming}
        assert set(unary) == {rpc.method for rpc in rpcs.UNARY if rpc.service == name}, name
        assert {m.name for m in service.methods} - set(unary) == streaming
        for rpc in (rpc for rpc in rpcs.UNARY if rpc.service == name):
            method = unary[rpc.method]
            assert method.input_type is rpc.request_type.DESCRIPTOR, rpc
            assert method.output_type is rpc.response_type.DESCRIPTOR, rpc
            # A mutation carries an idempotency key (ReserveOrder's legs derive theirs), or
            # is made safe to resend by ids of its own (a feed's events).
            keyed = "idempotency_key" in method.input_type.fields_by_name
            assert keyed == (rpc.mutating and rpc.retried_by == "idempotency_key"), rpc
    assert set(rpcs.BY_METHOD) == {
        m.name for m in pb.DESCRIPTOR.services_by_name["Inventory"].methods
    } - {"Batch"}
    item = pb.BatchItem.DESCRIPTOR.oneofs_by_name["call"]
    result = pb.BatchItemResult.DESCRIPTOR.fields_by_name
    assert [f.name for f in item.fields] == [rpc.field for rpc in rpcs.CALLS]
    for field, rpc in zip(item.fields, rpcs.CALLS, strict=True):
        assert field.message_type is rpc.request_type.DESCRIPTOR
        assert result[rpc.field].message_type is rpc.response_type.DESCRIPTOR
    assert tuple(rpc.field for rpc in rpcs.CALLS) == batching.CALL_FIELDS


def test_the_servicer_serves_every_unary_call_of_the_table() -> None:
    for rpc in (rpc for rpc in rpcs.UNARY if rpc.service == rpcs.INVENTORY):
        method = getattr(servicer.CallsServicer, rpc.method)
        assert method.__name__ == rpc.method
        assert method is not getattr(pb_grpc.InventoryServicer, rpc.method)
    for name in ("Send", "Stream"):
        assert getattr(servicer.IngestServicer, name) is not getattr(pb_grpc.IngestServicer, name)
    for rpc in (rpc for rpc in rpcs.UNARY if rpc.service == rpcs.HOT_KEYS):
        method = getattr(servicer.HotKeysServicer, rpc.method)
        assert method is not getattr(pb_grpc.HotKeysServicer, rpc.method), rpc
