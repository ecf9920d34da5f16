"""The rejection <-> google.rpc.Status table, checked in both directions for every rejection."""

from __future__ import annotations

import typing

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

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
    VersionMismatch,
)
from shard_router.common import errors

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
