"""A router's Watch service on 127.0.0.1 over a fake source, and a checking client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import grpc
from inventory.v1 import events_pb2, events_pb2_grpc

from shard_router.router.watch import (
    AvailabilityStreamService,
    Subscriber,
    WatchFilter,
    WatchHub,
    WatchLimits,
)

from .fake_source import FakeEventSource

MERCHANT = "m1"
# Small intervals keep every test short; each wait below is bounded by this.
EVENT_WAIT_S = 5.0
READ_UNTIL_WAIT_S = 10.0


@dataclass
class Served:
    hub: WatchHub
    source: FakeEventSource
    stub: events_pb2_grpc.AvailabilityStreamAsyncStub


@asynccontextmanager
async def serve(source: FakeEventSource, limits: WatchLimits) -> AsyncIterator[Served]:
    server = grpc.aio.server()
    async with WatchHub(source, limits, clock_ms=lambda: source.now_ms) as hub:
        events_pb2_grpc.add_AvailabilityStreamServicer_to_server(
            AvailabilityStreamService(hub), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = cast(
                    "events_pb2_grpc.AvailabilityStreamAsyncStub",
                    events_pb2_grpc.AvailabilityStreamStub(channel),
                )
                yield Served(hub, source, stub)
        finally:
            await server.stop(0)


@dataclass
class Watcher:
    """A client's view: latest level per key; fails if a key's version ever goes back."""

    versions: dict[tuple[str, str], int] = field(default_factory=dict)
    events: list[events_pb2.WatchEvent] = field(default_factory=list)
    token: str = ""

    def apply(self, event: events_pb2.WatchEvent) -> None:
        self.events.append(event)
        assert event.resume_token, "every event carries a token"
        self.token = event.resume_token
        kind = event.WhichOneof("kind")
        if kind == "snapshot":
            for level in event.snapshot.levels:
                self._see(level.key.sku_id, level.key.location_id, level.version, equal_ok=True)
        elif kind == "change":
            key = event.change.key
            self._see(key.sku_id, key.location_id, event.change.version, equal_ok=False)

    def _see(self, sku: str, location: str, version: int, equal_ok: bool) -> None:
        seen = self.versions.get((sku, location), 0)
        assert version > seen or (equal_ok and version == seen), (
            f"{sku}@{location}: version {version} after {seen}"
        )
        self.versions[(sku, location)] = version

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("kind")) for e in self.events]


async def next_event(
    call: grpc.aio.UnaryStreamCall[events_pb2.WatchRequest, events_pb2.WatchEvent],
) -> events_pb2.WatchEvent:
    async with asyncio.timeout(EVENT_WAIT_S):
        event = await call.read()
    assert isinstance(event, events_pb2.WatchEvent), f"stream ended: {event!r}"
    return event


async def read_until(
    call: grpc.aio.UnaryStreamCall[events_pb2.WatchRequest, events_pb2.WatchEvent],
    watcher: Watcher,
    done: object,
) -> None:
    """Read into ``watcher`` until ``done(watcher)`` holds (bounded by EVENT_WAIT_S each)."""
    assert callable(done)
    async with asyncio.timeout(READ_UNTIL_WAIT_S):
        while not done(watcher):
            watcher.apply(await next_event(call))


async def eventually(condition: Callable[[], bool], timeout_s: float = EVENT_WAIT_S) -> None:
    """Poll ``condition`` (state the test cannot await directly) until it holds."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)


async def take(stream: AsyncGenerator[events_pb2.WatchEvent, None]) -> events_pb2.WatchEvent:
    """The stream's next event, within EVENT_WAIT_S."""
    async with asyncio.timeout(EVENT_WAIT_S):
        return await anext(stream)


async def watch(
    hub: WatchHub, watch_filter: WatchFilter
) -> tuple[Subscriber, AsyncGenerator[events_pb2.WatchEvent, None]]:
    """A subscriber of ``hub`` whose stream has sent its (complete) snapshot."""
    subscriber = hub.subscribe(watch_filter)
    assert isinstance(subscriber, Subscriber)
    stream = subscriber.stream(None)
    assert (await take(stream)).snapshot.complete
    return subscriber, stream
