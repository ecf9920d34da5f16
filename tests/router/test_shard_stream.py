"""The router's stream to a shard (``ShardStream``), rule by rule (routing's docstring).

Each test drives a real gRPC stream to an in-process fake shard on 127.0.0.1 and judges
every item's answer by its class: a mutation that may have been applied is never answered
"not applied".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from inventory.v1 import inventory_pb2 as pb

from shard_router.common import errors
from shard_router.router.routing import Forwarded, ShardStream, StreamLimits

from .fake_shard import FakeShard, fake_shard, key, reserve_request, serving

WAIT_S = 20.0
FINAL = errors.AnswerClass.FINAL
RETRYABLE = errors.AnswerClass.RETRYABLE
UNKNOWN = errors.AnswerClass.OUTCOME_UNKNOWN


def run(scenario: Callable[[], Any]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(WAIT_S):
            await scenario()

    asyncio.run(bounded())


class Answers:
    """Collects the results handed to ``answer``, and can wait for a number of them."""

    def __init__(self) -> None:
        self.results: list[pb.BatchItemResult] = []
        self._arrived = asyncio.Event()

    def answer(self, result: pb.BatchItemResult) -> None:
        self.results.append(result)
        self._arrived.set()

    async def wait_for(self, count: int) -> list[pb.BatchItemResult]:
        while len(self.results) < count:
            self._arrived.clear()
            await self._arrived.wait()
        return self.results

    def by_id(self) -> dict[int, pb.BatchItemResult]:
        return {result.id: result for result in self.results}


def reserve_item(item_id: int, sku: str = "rice") -> pb.BatchItem:
    return pb.BatchItem(id=item_id, reserve=reserve_request(f"k-{item_id}", "store-a", sku))


def forwarded(
    answers: Answers, item: pb.BatchItem, deadline_s: float = 5.0, *, mutating: bool = True
) -> Forwarded:
    return Forwarded.of(item, time.monotonic() + deadline_s, mutating, answers.answer)


@asynccontextmanager
async def stream_to(shard: FakeShard, **limits: Any) -> AsyncIterator[ShardStream]:
    async with (
        serving(shard) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stream = ShardStream(channel, StreamLimits(**limits))
        try:
            yield stream
        finally:
            await stream.close()


def test_a_group_is_sent_as_given_and_each_item_answered_once_under_its_callers_id() -> None:
    async def scenario() -> None:
        shard = fake_shard()
        answers = Answers()
        async with stream_to(shard) as stream:
            items = [reserve_item(item_id) for item_id in range(101, 106)]
            sent = [item.reserve.SerializeToString() for item in items]
            stream.forward([forwarded(answers, item) for item in items])
            results = await answers.wait_for(5)
            await asyncio.sleep(0.05)  # nothing more arrives
        assert sorted(r.id for r in results) == list(range(101, 106))
        assert all(r.reserve.reservation.reservation_id == f"k-{r.id}" for r in results)
        assert len(shard.requests) == 1, "an idle stream sends the group in one request"
        seen = shard.requests[0].items
        assert [item.reserve.SerializeToString() for item in seen] == sent
        assert all(0 < item.timeout_ms <= 5000 for item in seen), "the time each has left"

    run(scenario)


def test_items_queued_while_every_slot_is_taken_are_gathered_into_the_next_request() -> None:
    async def scenario() -> None:
        shard = fake_shard()
        answers = Answers()
        async with stream_to(shard, requests_in_flight_max=2) as stream:
            for item_id in (1, 2):
                stream.forward([forwarded(answers, reserve_item(item_id, "hold-a"))])
                await shard.requests_read(item_id)
            for item_id in (3, 4, 5):
                stream.forward([forwarded(answers, reserve_item(item_id, "hold-a"))])
            await asyncio.sleep(0.1)
            assert len(shard.requests) == 2, "two slots: the third request waits"
            shard.release.set()
            await answers.wait_for(5)
        assert [len(request.items) for request in shard.requests] == [1, 1, 3]

    run(scenario)


def test_an_item_out_of_time_before_it_is_sent_is_answered_not_applied_and_never_sent() -> None:
    async def scenario() -> None:
        shard = fake_shard()
        answers = Answers()
        async with stream_to(shard) as stream:
            stream.forward([forwarded(answers, reserve_item(7), deadline_s=-0.1)])
            [result] = await answers.wait_for(1)
        assert result.id == 7
        assert errors.reason_of(result.error) == "DEADLINE_NOT_APPLIED"
        assert errors.answer_class_of(result.error) is RETRYABLE
        assert shard.items_seen == []

    run(scenario)


def test_a_silent_shard_is_given_up_after_the_grace_unknown_for_a_mutation_not_a_read() -> None:
    async def scenario() -> None:
        shard = fake_shard()
        answers = Answers()
        read = pb.BatchItem(
            id=2, get_availability=pb.GetAvailabilityRequest(keys=[key("a", "silent-a")])
        )
        limits = {"requests_in_flight_max": 1, "answer_grace_s": 0.1, "close_drain_s_max": 0.1}
        async with stream_to(shard, **limits) as stream:
            stream.forward(
                [
                    forwarded(answers, reserve_item(1, "silent-a"), deadline_s=0.2),
                    forwarded(answers, read, deadline_s=0.4, mutating=False),
                ]
            )
            await answers.wait_for(2)
            # Both given up: the request's slot is free again for the next item.
            stream.forward([forwarded(answers, reserve_item(3))])
            await answers.wait_for(3)
        results = answers.by_id()
        assert errors.reason_of(results[1].error) == "DEADLINE_PASSED"
        assert errors.answer_class_of(results[1].error) is UNKNOWN, "it may have been applied"
        assert errors.reason_of(results[2].error) == "DEADLINE_PASSED"
        assert errors.answer_class_of(results[2].error) is RETRYABLE, "a read applies nothing"
        assert results[3].WhichOneof("result") == "reserve"

    run(scenario)


def test_a_broken_stream_answers_what_was_sent_unknown_the_rest_retryable_then_reopens() -> None:
    async def scenario() -> None:
        shard = fake_shard(break_streams=1)
        answers = Answers()
        async with stream_to(shard, requests_in_flight_max=1) as stream:
            stream.forward([forwarded(answers, reserve_item(1))])
            await shard.requests_read(1)
            stream.forward([forwarded(answers, reserve_item(2))])  # waits for the slot
            shard.break_now.set()
            await answers.wait_for(2)
            stream.forward([forwarded(answers, reserve_item(3))])  # on a new stream
            await answers.wait_for(3)
        results = answers.by_id()
        for item_id, answer_class in ((1, UNKNOWN), (2, RETRYABLE)):
            assert errors.reason_of(results[item_id].error) == "STREAM_BROKEN"
            assert errors.answer_class_of(results[item_id].error) is answer_class
        assert results[3].WhichOneof("result") == "reserve"
        assert shard.streams_opened == 2

    run(scenario)


def test_past_pending_items_max_an_item_is_answered_overloaded_at_once() -> None:
    async def scenario() -> None:
        shard = fake_shard()
        answers = Answers()
        async with stream_to(shard, pending_items_max=2) as stream:
            items = [reserve_item(item_id, "hold-a") for item_id in (1, 2, 3)]
            stream.forward([forwarded(answers, item) for item in items])
            [shed] = answers.results  # at once, before anything was sent
            assert stream.pending_items == 2
            shard.release.set()
            await answers.wait_for(3)
        assert shed.id == 3
        assert errors.reason_of(shed.error) == "OVERLOADED"
        assert errors.answer_class_of(shed.error) is RETRYABLE
        assert {r.id for r in answers.results if r.WhichOneof("result") == "reserve"} == {1, 2}

    run(scenario)


def test_a_cancelled_call_is_forgotten_and_frees_its_slot() -> None:
    async def scenario() -> None:
        shard = fake_shard()
        async with stream_to(shard, requests_in_flight_max=1, close_drain_s_max=0.1) as stream:
            deadline = time.monotonic() + 5.0
            waiting = asyncio.create_task(
                stream.call(reserve_item(1, "hold-a"), deadline, mutating=True)
            )
            await shard.requests_read(1)
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            assert stream.pending_items == 0
            result = await stream.call(reserve_item(2), deadline, mutating=True)
            assert result.id == 2 and result.WhichOneof("result") == "reserve"

    run(scenario)


def test_close_lets_pending_items_finish_then_answers_new_ones_not_applied() -> None:
    async def scenario() -> None:
        shard = fake_shard()
        answers = Answers()
        async with stream_to(shard) as stream:
            stream.forward([forwarded(answers, reserve_item(1, "hold-a"))])
            await shard.requests_read(1)
            closing = asyncio.create_task(stream.close())
            await asyncio.sleep(0.05)
            assert not closing.done(), "close waits for the pending item"
            shard.release.set()
            await closing
            stream.forward([forwarded(answers, reserve_item(2))])
            await answers.wait_for(2)
        results = answers.by_id()
        assert results[1].WhichOneof("result") == "reserve"
        assert errors.reason_of(results[2].error) == "STREAM_BROKEN"
        assert errors.answer_class_of(results[2].error) is RETRYABLE
        assert len(shard.items_seen) == 1

    run(scenario)
