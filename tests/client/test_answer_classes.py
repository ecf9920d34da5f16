"""Each answer class seen by the client, against the scripted server (DESIGN section 11).

final: raised at once, never resent. Retryable (nothing applied): resent until it succeeds,
else ``NotApplied``. Outcome unknown (maybe applied): resent with the same idempotency key,
which the server answers from its idempotency memory; if the client gives up, the caller
gets ``OutcomeUnknown`` whenever any attempt was of unknown outcome. Each scenario checks the
caller's answer against what the fake server actually did (``applied``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

import inventory_core as core
from shard_router.client import (
    AnswerClass,
    CapacityExhausted,
    DeadlineExceeded,
    InventoryClient,
    InventoryError,
    NotApplied,
    OutcomeUnknown,
    Overloaded,
    Unavailable,
    key,
    line,
)
from shard_router.client._errors import error_from_status, given_up
from shard_router.common import errors
from tests.client.fake_inventory import (
    AfterApply,
    FakeInventory,
    classed,
    fake_inventory,
    serving,
    statuses,
)

BATCHING = pytest.mark.parametrize("batching", [True, False], ids=["batched", "unary"])
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

# The shell's answers, built by the service's own table.
NOT_OWNER = errors.not_owner(7, "partition 7 lives elsewhere")
RECOVERING = errors.partition_recovering(7, "partition 7 is recovering")
OVERLOADED = errors.overloaded("request queue full")
DEADLINE_NOT_APPLIED = errors.deadline_not_applied("deadline passed before the work was applied")
FLUSH_UNKNOWN = errors.flush_failed("flush outcome unknown", [7])
# A newer server's final answer whose code alone looks transient: the class decides.
FINAL_UNAVAILABLE = classed(UNAVAILABLE, "final", "NEWER_FINAL_REASON", "do not resend")

ADVICE = "retry with the same idempotency key"


def fast_client(
    address: str, *, batching: bool = True, retry_attempts_max: int = 8
) -> InventoryClient:
    return InventoryClient(
        address,
        batching=batching,
        retry_attempts_max=retry_attempts_max,
        backoff_s_initial=0.001,
        backoff_s_max=0.005,
        seed=1,
    )


def reserve_line(sku: str = "sku-1") -> pb.ReservationLine:
    return line(key("m-1", sku, "store-1"), 1)


def run_with(fake: FakeInventory, scenario: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serving(fake) as address:
            await scenario(address)

    asyncio.run(main())


# ---------------------------------------------------------------------------- final


@BATCHING
def test_a_final_answer_is_raised_at_once_even_with_a_transient_looking_code(
    batching: bool,
) -> None:
    fake = fake_inventory(script=deque([FINAL_UNAVAILABLE]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            with pytest.raises(InventoryError) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1")
        assert type(caught.value) is InventoryError
        assert caught.value.answer_class is AnswerClass.FINAL
        assert caught.value.error_reason == "NEWER_FINAL_REASON"

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"]
    assert fake.applied["order-1"] == 0


@BATCHING
def test_a_final_rejection_after_an_unknown_attempt_is_the_true_answer(batching: bool) -> None:
    capacity = errors.rejection_to_status(core.CapacityExhausted("live_reservations_max", 10))
    fake = fake_inventory(script=deque([FLUSH_UNKNOWN, capacity]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            with pytest.raises(CapacityExhausted) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1")
        assert caught.value.answer_class is AnswerClass.FINAL

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"] * 2


# ------------------------------------------------------------------------ retryable


@BATCHING
def test_retryable_answers_are_retried_until_the_call_succeeds(batching: bool) -> None:
    fake = fake_inventory(script=deque([NOT_OWNER, RECOVERING, OVERLOADED, DEADLINE_NOT_APPLIED]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            answer = await c.reserve([reserve_line()], idempotency_key="order-1")
        assert answer.reservation.reservation_id == "r-order-1"

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"] * 5
    assert fake.applied["order-1"] == 1


@BATCHING
@pytest.mark.parametrize(
    ("last", "raised"),
    [(NOT_OWNER, NotApplied), (OVERLOADED, Overloaded), (DEADLINE_NOT_APPLIED, NotApplied)],
    ids=["not-owner", "overloaded", "deadline-not-applied"],
)
def test_giving_up_after_retryable_answers_only_says_nothing_was_applied(
    batching: bool, last: status_pb2.Status, raised: type[NotApplied]
) -> None:
    fake = fake_inventory(script=deque([RECOVERING, NOT_OWNER, last]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching, retry_attempts_max=3) as c:
            with pytest.raises(NotApplied) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1")
        error = caught.value
        assert type(error) is raised
        assert not isinstance(error, OutcomeUnknown)
        assert error.answer_class is AnswerClass.RETRYABLE
        assert error.attempts == 3
        assert "nothing was applied" in str(error)

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"] * 3
    assert fake.applied["order-1"] == 0  # the truth: nothing was


@BATCHING
def test_a_deadline_spent_on_retryable_answers_only_is_not_applied(batching: bool) -> None:
    fake = fake_inventory(script=deque([RECOVERING] * 1000))

    async def scenario(address: str) -> None:
        async with InventoryClient(
            address, batching=batching, retry_attempts_max=1000, backoff_s_initial=0.02, seed=1
        ) as c:
            with pytest.raises(NotApplied) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1", timeout_s=0.2)
        assert caught.value.code == DEADLINE_EXCEEDED
        assert "no attempt was applied" in str(caught.value)

    run_with(fake, scenario)
    assert fake.applied["order-1"] == 0


# ------------------------------------------------------------------ outcome unknown


@BATCHING
def test_an_unknown_outcome_is_resent_with_the_same_key_and_gets_the_original_answer(
    batching: bool,
) -> None:
    """The flush committed but its reply was lost: the resend is answered from memory."""
    fake = fake_inventory(script=deque([AfterApply(FLUSH_UNKNOWN)]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            answer = await c.reserve([reserve_line()], idempotency_key="order-1")
        assert answer.reservation.reservation_id == "r-order-1"

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1"] * 2  # the same key both times
    assert fake.applied["order-1"] == 1  # applied once, not twice


@BATCHING
def test_giving_up_after_any_unknown_attempt_is_outcome_unknown(batching: bool) -> None:
    """The last answer said "not applied", but the first attempt was: the caller must not be
    told nothing happened."""
    fake = fake_inventory(script=deque([AfterApply(FLUSH_UNKNOWN), NOT_OWNER, RECOVERING]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching, retry_attempts_max=3) as c:
            with pytest.raises(Unavailable) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1")
        error = caught.value
        assert isinstance(error, OutcomeUnknown)
        assert error.answer_class is AnswerClass.OUTCOME_UNKNOWN
        assert error.attempts == 3
        assert "an earlier attempt's outcome is unknown" in str(error)
        assert ADVICE in str(error)

    run_with(fake, scenario)
    assert fake.applied["order-1"] == 1  # the truth: it was applied


@BATCHING
def test_a_deadline_spent_after_an_unknown_attempt_is_deadline_exceeded_unknown(
    batching: bool,
) -> None:
    fake = fake_inventory(script=deque([FLUSH_UNKNOWN, *[RECOVERING] * 1000]))

    async def scenario(address: str) -> None:
        async with InventoryClient(
            address, batching=batching, retry_attempts_max=1000, backoff_s_initial=0.02, seed=1
        ) as c:
            with pytest.raises(DeadlineExceeded) as caught:
                await c.reserve([reserve_line()], idempotency_key="order-1", timeout_s=0.2)
        assert caught.value.answer_class is AnswerClass.OUTCOME_UNKNOWN
        assert "an attempt's outcome was unknown" in str(caught.value)

    run_with(fake, scenario)


@BATCHING
def test_a_mutation_without_an_idempotency_key_is_never_resent_after_an_unknown_outcome(
    batching: bool,
) -> None:
    fake = fake_inventory(script=deque([AfterApply(FLUSH_UNKNOWN)]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            with pytest.raises(Unavailable) as caught:
                await c.reserve([reserve_line()], idempotency_key="")
        assert "not resent: it has no idempotency key" in str(caught.value)

    run_with(fake, scenario)
    assert fake.keys_seen == [""]
    assert fake.applied[""] == 1  # it was applied; the caller was told it may have been


@BATCHING
def test_a_read_of_unknown_outcome_is_simply_asked_again(batching: bool) -> None:
    fake = fake_inventory(script=deque([None, FLUSH_UNKNOWN]))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            await c.reserve([reserve_line()], idempotency_key="order-1")
            found = await c.get_reservation("m-1", "r-order-1")
        assert found.reservation.reservation_id == "r-order-1"

    run_with(fake, scenario)
    assert fake.keys_seen == ["order-1", "r-order-1", "r-order-1"]


# ---------------------------------------------------------- the caller's own deadline


@BATCHING
def test_a_client_deadline_shorter_than_a_slow_flush_is_unknown_and_the_retry_lands_on_the_truth(
    batching: bool,
) -> None:
    """The server applies the work after the caller stopped waiting; the caller is told the
    outcome is unknown (not "nothing applied"), and its retry with the same key gets the
    original answer from the server's idempotency memory."""
    fake = fake_inventory()  # its flush of slowflush-* waits until the test opens the gate
    slow = [reserve_line("slowflush-1")]

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching) as c:
            with pytest.raises(DeadlineExceeded) as caught:
                await c.reserve(slow, idempotency_key="order-1", timeout_s=0.1)
            error = caught.value
            assert error.answer_class is AnswerClass.OUTCOME_UNKNOWN
            assert error.code == DEADLINE_EXCEEDED
            assert ADVICE in str(error)
            assert fake.applied["order-1"] == 0  # not yet: the flush is still running

            fake.flush_gate.set()  # the flush completes after the caller stopped waiting
            async with asyncio.timeout(2.0):
                await fake.wait_applied("order-1")
            assert fake.applied["order-1"] == 1
            retried = await c.reserve(slow, idempotency_key="order-1", timeout_s=2.0)
        assert retried.reservation.reservation_id == "r-order-1"

    run_with(fake, scenario)
    assert fake.applied["order-1"] == 1  # the true fate: applied once
    assert fake.keys_seen == ["order-1"] * 2


# ------------------------------------------------------------------ the mapping itself


@pytest.mark.parametrize(
    ("status", "raised", "answer_class"),
    [
        (NOT_OWNER, NotApplied, AnswerClass.RETRYABLE),
        (OVERLOADED, Overloaded, AnswerClass.RETRYABLE),
        (DEADLINE_NOT_APPLIED, NotApplied, AnswerClass.RETRYABLE),
        (FLUSH_UNKNOWN, Unavailable, AnswerClass.OUTCOME_UNKNOWN),
        (
            classed(DEADLINE_EXCEEDED, "outcome_unknown", "GAVE_UP", "no answer"),
            DeadlineExceeded,
            AnswerClass.OUTCOME_UNKNOWN,
        ),
        (
            errors.status(DEADLINE_EXCEEDED, "gRPC's own"),
            DeadlineExceeded,
            AnswerClass.OUTCOME_UNKNOWN,
        ),
        (errors.status(UNAVAILABLE, "transport"), Unavailable, AnswerClass.OUTCOME_UNKNOWN),
        (
            errors.status(grpc.StatusCode.INTERNAL, "?"),
            OutcomeUnknown,
            AnswerClass.OUTCOME_UNKNOWN,
        ),
        (FINAL_UNAVAILABLE, InventoryError, AnswerClass.FINAL),
        (errors.status(RESOURCE_EXHAUSTED, "bare"), InventoryError, AnswerClass.FINAL),
    ],
)
def test_each_status_maps_to_the_exception_of_its_class(
    status: status_pb2.Status, raised: type[InventoryError], answer_class: AnswerClass
) -> None:
    error = error_from_status(status)
    assert type(error) is raised
    assert error.answer_class is answer_class
    assert (ADVICE in str(error)) == (answer_class is AnswerClass.OUTCOME_UNKNOWN)


def test_a_give_up_is_unknown_exactly_when_some_attempt_was() -> None:
    for deadline_passed in (False, True):
        known = given_up(NOT_OWNER, 4, unknown_seen=False, deadline_passed=deadline_passed)
        assert isinstance(known, NotApplied), deadline_passed
        unknown = given_up(NOT_OWNER, 4, unknown_seen=True, deadline_passed=deadline_passed)
        assert isinstance(unknown, OutcomeUnknown), deadline_passed
        assert unknown.attempts == known.attempts == 4
    assert type(given_up(NOT_OWNER, 2, unknown_seen=True, deadline_passed=True)) is DeadlineExceeded
    assert type(given_up(OVERLOADED, 2, unknown_seen=False)) is Overloaded


@BATCHING
def test_a_read_that_gives_up_reports_nothing_applied(batching: bool) -> None:
    """A read changes nothing: even gRPC's own UNAVAILABLE leaves nothing to learn."""
    fake = fake_inventory(script=deque(statuses(*[UNAVAILABLE] * 3)))

    async def scenario(address: str) -> None:
        async with fast_client(address, batching=batching, retry_attempts_max=3) as c:
            with pytest.raises(NotApplied) as caught:
                await c.get_reservation("m-1", "r-order-1")
        assert not isinstance(caught.value, OutcomeUnknown)
        assert caught.value.attempts == 3

    run_with(fake, scenario)
    assert fake.keys_seen == ["r-order-1"] * 3
