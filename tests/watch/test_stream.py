"""Watch end to end over a real grpc.aio server on loopback, with the in-memory source."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status
from inventory.v1 import events_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import validate_identifier
from shard_router.common import errors
from shard_router.router._watch_token import decode
from shard_router.router.watch import SnapshotRefused, WatchLimits

from .fake_source import FakeEventSource
from .harness import MERCHANT, Watcher, eventually, next_event, read_until, serve

FAST = WatchLimits(heartbeat_interval_s=0.2, read_block_ms=50, source_retry_backoff_s_max=0.05)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def request(**fields: Any) -> events_pb2.WatchRequest:
    return events_pb2.WatchRequest(merchant_id=MERCHANT, **fields)


def test_snapshot_comes_first_in_chunks_then_changes() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        for sku in ("a", "b", "c"):
            source.write(MERCHANT, sku, "l1", 10)
        source.write("other", "a", "l1", 5)
        limits = WatchLimits(snapshot_levels_per_message_max=2, read_block_ms=50)
        async with serve(source, limits) as served:
            call = served.stub.Watch(request())
            watcher = Watcher()
            for _ in range(2):
                watcher.apply(await next_event(call))
            first, last = (e.snapshot for e in watcher.events)
            assert [len(first.levels), len(last.levels)] == [2, 1]
            assert (first.complete, last.complete) == (False, True)
            assert {first.reason, last.reason} == {"initial"}
            source.write(MERCHANT, "b", "l1", 7)
            source.write("other", "a", "l1", 6)
            event = await next_event(call)
            assert event.change.key.sku_id == "b" and event.change.version == 2
            assert event.change.after.on_hand == 7
            call.cancel()

    run(scenario)


def test_filter_by_location_and_sku_sends_only_matching_keys() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        for sku in ("a", "b"):
            for location in ("l1", "l2"):
                source.write(MERCHANT, sku, location, 1)
        async with serve(source, FAST) as served:
            call = served.stub.Watch(request(location_ids=["l1"], sku_ids=["a"]))
            snapshot = (await next_event(call)).snapshot
            assert [(x.key.sku_id, x.key.location_id) for x in snapshot.levels] == [("a", "l1")]
            for sku in ("a", "b"):
                for location in ("l1", "l2"):
                    source.write(MERCHANT, sku, location, 2)
            source.write(MERCHANT, "a", "l1", 3)  # coalesced with version 2: latest wins
            change = (await next_event(call)).change
            assert (change.key.sku_id, change.key.location_id, change.version) == ("a", "l1", 3)
            assert (await next_event(call)).WhichOneof("kind") == "heartbeat"
            call.cancel()

    run(scenario)


def test_resume_after_disconnect_converges_and_never_goes_back() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        keys = [(f"s{i}", f"l{i % 7}") for i in range(30)]
        for sku, location in keys:
            source.write(MERCHANT, sku, location, 0)
        writes_done = asyncio.Event()

        async def writer() -> None:
            for step in range(600):
                sku, location = keys[(step * 7) % len(keys)]
                source.write(MERCHANT, sku, location, step)
                if step % 20 == 0:
                    await asyncio.sleep(0.005)
            writes_done.set()

        async with serve(source, FAST) as served:
            watcher = Watcher()
            call = served.stub.Watch(request())
            writing = asyncio.create_task(writer())

            def replayable_after_some_changes(w: Watcher) -> bool:
                token = decode(w.token, 1024)
                changes = w.kinds().count("change")
                return changes >= 40 and not isinstance(token, str) and token.positions is not None

            await read_until(call, watcher, replayable_after_some_changes)
            call.cancel()
            seen_before = len(watcher.events)
            await asyncio.sleep(0.05)  # changes land while disconnected
            call = served.stub.Watch(request(resume_token=watcher.token))
            await writing

            def converged(w: Watcher) -> bool:
                return writes_done.is_set() and w.versions == source.versions(MERCHANT)

            await read_until(call, watcher, converged)
            assert "snapshot" not in watcher.kinds()[seen_before:], "resumed without snapshot"
            assert source.calls.get("range", 0) > 0, "caught up from the streams"
            call.cancel()

    run(scenario)


def test_token_too_old_gets_a_fresh_snapshot_saying_so() -> None:
    async def scenario() -> None:
        source = FakeEventSource(stream_entries_max=5)
        source.write(MERCHANT, "a", "l1", 1)
        async with serve(source, FAST) as served:
            watcher = Watcher()
            call = served.stub.Watch(request())
            watcher.apply(await next_event(call))
            source.write(MERCHANT, "a", "l1", 2)

            def replayable(w: Watcher) -> bool:
                token = decode(w.token, 1024)
                return not isinstance(token, str) and token.positions is not None

            await read_until(call, watcher, lambda w: replayable(w) and "change" in w.kinds())
            call.cancel()
            for value in range(3, 20):  # trims the entries the token would replay
                source.write(MERCHANT, "a", "l1", value)
            call = served.stub.Watch(request(resume_token=watcher.token))
            event = await next_event(call)
            watcher.apply(event)
            assert event.snapshot.reason == "resume_token_too_old"
            assert [x.version for x in event.snapshot.levels] == [19]
            call.cancel()

    run(scenario)


def test_idle_streams_get_heartbeats_with_tokens() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        source.write(MERCHANT, "a", "l1", 1)
        limits = WatchLimits(heartbeat_interval_s=0.05, read_block_ms=20)
        async with serve(source, limits) as served:
            call = served.stub.Watch(request())
            watcher = Watcher()
            started = time.monotonic()
            await read_until(call, watcher, lambda w: w.kinds().count("heartbeat") >= 3)
            assert time.monotonic() - started < 2.0
            assert watcher.kinds()[0] == "snapshot"
            assert watcher.events[-1].heartbeat.server_time_ms == source.now_ms
            call.cancel()

    run(scenario)


def test_subscribers_max_refuses_one_more_then_admits_after_one_leaves() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        async with serve(source, WatchLimits(subscribers_max=2, read_block_ms=50)) as served:
            calls = [served.stub.Watch(request()) for _ in range(2)]
            for call in calls:
                assert (await next_event(call)).snapshot.complete
            refused = served.stub.Watch(request())
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await next_event(refused)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert served.hub.metrics.subscribers == 2
            calls[0].cancel()
            await eventually(lambda: served.hub.metrics.subscribers == 1)
            admitted = served.stub.Watch(request())
            assert (await next_event(admitted)).snapshot.complete
            for call in (calls[1], admitted):
                call.cancel()

    run(scenario)


def test_invalid_requests_are_refused() -> None:
    async def scenario() -> None:
        async with serve(FakeEventSource(), FAST) as served:
            for bad in (
                events_pb2.WatchRequest(),
                request(resume_token="not-a-token"),
                request(location_ids=["x"] * 101),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await next_event(served.stub.Watch(bad))
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario)


def test_a_filter_refuses_exactly_the_ids_reserve_refuses() -> None:
    """The core's identifier rule (inventory_core.validate_watch_filter), not a length check:
    an id Reserve would refuse is refused here too, with the field that holds it."""
    bad_id = "store 7"  # a space: fits the length, refused by Reserve
    assert validate_identifier("location_id", bad_id) is not None

    async def scenario() -> None:
        async with serve(FakeEventSource(), FAST) as served:
            for bad, field in (
                (request(location_ids=["l1", bad_id]), "location_ids[1]"),
                (request(sku_ids=["sku/1"]), "sku_ids[0]"),
                (events_pb2.WatchRequest(merchant_id="m\n1"), "merchant_id"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await next_event(served.stub.Watch(bad))
                status = rpc_status.from_call(error.value)
                rejection = errors.rejection_from_status(status)
                assert rejection is not None and getattr(rejection, "field", None) == field
                assert errors.answer_class_of(status) is errors.AnswerClass.FINAL

    run(scenario)


def test_source_outage_keeps_streams_with_heartbeats_then_changes_resume() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        source.write(MERCHANT, "a", "l1", 1)
        limits = WatchLimits(
            heartbeat_interval_s=0.05, read_block_ms=20, source_retry_backoff_s_max=0.02
        )
        async with serve(source, limits) as served:
            call = served.stub.Watch(request())
            watcher = Watcher()
            watcher.apply(await next_event(call))
            source.failing = True
            source.write(MERCHANT, "a", "l1", 2)  # published while the reader cannot read
            await read_until(call, watcher, lambda w: w.kinds().count("heartbeat") >= 3)
            source.failing = False
            await read_until(call, watcher, lambda w: w.versions[("a", "l1")] == 2)
            assert "resync" not in watcher.kinds(), "nothing was trimmed: no resync needed"
            assert served.hub.metrics.source_errors > 0
            call.cancel()

    run(scenario)


def test_entries_trimmed_during_an_outage_resync_every_subscriber() -> None:
    async def scenario() -> None:
        source = FakeEventSource(stream_entries_max=3)
        source.write(MERCHANT, "a", "l1", 1)
        limits = WatchLimits(
            heartbeat_interval_s=0.05, read_block_ms=20, source_retry_backoff_s_max=0.02
        )
        async with serve(source, limits) as served:
            call = served.stub.Watch(request())
            watcher = Watcher()
            watcher.apply(await next_event(call))
            source.failing = True
            await asyncio.sleep(0.05)
            for value in range(2, 12):
                source.write(MERCHANT, "a", "l1", value)
            source.failing = False
            await read_until(call, watcher, lambda w: w.versions[("a", "l1")] == 11)
            kinds = watcher.kinds()
            assert "resync" in kinds
            resync = watcher.events[kinds.index("resync")].resync
            assert resync.reason == "events_unavailable"
            after = watcher.events[kinds.index("resync") + 1]
            assert after.snapshot.reason == "resync"
            call.cancel()

    run(scenario)


def test_a_snapshot_the_source_refuses_ends_the_call_with_resource_exhausted() -> None:
    class Refusing(FakeEventSource):
        async def snapshot(
            self, merchant_id: str, location_ids: Sequence[str], sku_ids: Sequence[str]
        ) -> list[tuple[pb.StockLevel, int, int]]:
            raise SnapshotRefused(matching=200_000, limit=100_000)

    async def scenario() -> None:
        async with serve(Refusing(), FAST) as served:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await next_event(served.stub.Watch(request()))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await eventually(lambda: served.hub.metrics.subscribers == 0)

    run(scenario)
