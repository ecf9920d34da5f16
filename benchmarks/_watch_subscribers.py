"""Watch streams in a load-generator child process of the event benchmark.

The parent (``benchmarks.watch_load``) starts ``--client-processes`` children with the
``spawn`` method (gRPC does not survive ``fork``) and talks to each over a ``Pipe``:

0. child: ``("started", None)`` once imported; parent: ``("go", None)`` when all are, so
   the ramp's CPU window holds no interpreter start-up;
1. child: opens ``ceil(streams / streams_per_channel)`` channels, starts its Watch streams
   at most ``ramp_concurrency`` awaiting their snapshot at a time, sends ``("established",
   n)`` as they complete and ``("ready", Ready)`` when every stream has its snapshot or failed;
2. parent: runs the writes, reads the servers' final versions (STRONG) and sends
   ``("truth", Truth)`` (or ``("stop", None)`` to abort);
3. child: waits, bounded, until every stream's versions equal the truth, keeps the streams
   open ``idle_s`` longer (idle streams get heartbeats), then reports ``("result", Result)``
   and exits.

Lag of a change = wall-clock ms when the child took the message off the stream minus the
change's ``committed_at_ms`` (when its batch was durable on the shard, same host clock);
the cross-check uses the writer's acknowledgement time of the reservation that made that
version instead. Both include the child's own scheduling delay: the report shows the
children's CPU use, so a saturated load generator is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import psutil
import uvloop
from inventory.v1 import events_pb2
from inventory.v1 import events_pb2_grpc as events_grpc

from .histograms import LATENCY_US_MAX, LATENCY_US_MIN, new_histogram

KeyId = tuple[str, str]  # (location_id, sku_id) within a stream's merchant
AckKey = tuple[str, str, str, int]  # (merchant, location, sku, version)
# How often convergence is checked once the truth is known.
CONVERGE_POLL_S = 0.05
# Channel options: many concurrent streams per channel, messages as large as the server's.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_concurrent_streams", 1000),
]


@dataclass(frozen=True)
class ChildSpec:
    address: str
    streams: list[tuple[int, str]]  # (stream index, merchant)
    streams_per_channel: int
    ramp_concurrency: int
    ramp_timeout_s: float


@dataclass(frozen=True)
class Ready:
    established: int
    failed: dict[str, int]
    ramp_s: float
    snapshot_latency: str  # encoded HDR histogram (us), Watch call to complete snapshot


@dataclass(frozen=True)
class Truth:
    versions: dict[str, dict[KeyId, int]]  # merchant -> key -> final version (STRONG)
    acks: dict[AckKey, float]  # the writer's acknowledgement wall ms per version it made
    converge_timeout_s: float
    idle_s: float


@dataclass
class StreamResult:
    index: int
    merchant: str
    established: bool
    alive: bool  # still open (no error, not ended by the server) when measured
    ended: str  # status code name when the stream ended early, else ""
    snapshot_s: float
    changes: int  # change messages delivered after the first snapshot
    expected: int  # versions the merchant's keys advanced after the snapshot (from truth)
    skipped: int  # versions not delivered one by one (coalesced or covered by a resync)
    backwards: int  # versions at or below one already seen (must stay 0)
    heartbeats: int
    resyncs: int
    missed_keys: int  # keys whose last version seen differs from the truth
    lag_max_ms: float


@dataclass
class Result:
    streams: list[StreamResult]
    lag: str  # encoded HDR (us): receive - committed_at_ms
    ack_lag: str  # encoded HDR (us): receive - writer's acknowledgement
    ack_lag_negative: int  # receipts that came before the writer saw its acknowledgement
    ack_lag_unmatched: int  # changes with no acknowledgement (e.g. the ack was lost)
    reasons: dict[str, int]
    converged: bool
    converge_s: float
    cpu_s: float


@dataclass
class _Stream:
    index: int
    merchant: str
    versions: dict[KeyId, int] = field(default_factory=dict)
    snapshot_versions: dict[KeyId, int] | None = None
    started_s: float = 0.0
    snapshot_s: float = 0.0
    changes: int = 0
    skipped: int = 0
    backwards: int = 0
    heartbeats: int = 0
    resyncs: int = 0
    lag_max_ms: float = 0.0
    ended: str = ""
    done: bool = False
    receipts: list[tuple[str, str, int, float]] = field(default_factory=list)
    call: Any = None


def _record(histogram: Any, lag_ms: float) -> None:
    histogram.record_value(min(max(int(lag_ms * 1000.0), LATENCY_US_MIN), LATENCY_US_MAX))


class _Group:
    """This child's streams and what they saw."""

    def __init__(self, spec: ChildSpec, conn: Connection) -> None:
        self.spec = spec
        self.conn = conn
        self.streams = [_Stream(i, m) for i, m in spec.streams]
        self.lag = new_histogram()
        self.snapshot_latency = new_histogram()
        self.reasons: Counter[str] = Counter()
        self.established = 0
        self.failed: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(spec.ramp_concurrency)
        self._settled = 0
        self._all_settled = asyncio.Event()
        self._report_every = max(1, len(self.streams) // 50)
        self.cancelling = False
        self.closed = False
        self.tasks: list[asyncio.Future[None]] = []
        self.channels: list[grpc.aio.Channel] = []

    def _settle(self, stream: _Stream, established: bool) -> None:
        """A stream has its first snapshot, or failed before it: frees a ramp slot."""
        self._slots.release()
        self._settled += 1
        if established:
            self.established += 1
            if self.established % self._report_every == 0:
                self.conn.send(("established", self._report_every))
        if self._settled == len(self.streams):
            self._all_settled.set()

    async def follow(self, stream: _Stream, channel: grpc.aio.Channel) -> None:
        await self._slots.acquire()
        settled = False
        stub = events_grpc.AvailabilityStreamStub(channel)
        stream.started_s = time.monotonic()
        call = stub.Watch(events_pb2.WatchRequest(merchant_id=stream.merchant))
        stream.call = call
        try:
            async for message in call:
                now_ms = time.time_ns() / 1e6
                kind = message.WhichOneof("kind")
                if kind == "change":
                    self._change(stream, message.change, now_ms)
                elif kind == "snapshot":
                    self._snapshot(stream, message.snapshot)
                    if message.snapshot.complete and not settled:
                        settled = True
                        stream.snapshot_s = time.monotonic() - stream.started_s
                        stream.snapshot_versions = dict(stream.versions)
                        _record(self.snapshot_latency, stream.snapshot_s * 1000.0)
                        self._settle(stream, established=True)
                elif kind == "heartbeat":
                    stream.heartbeats += 1
                elif kind == "resync":
                    stream.resyncs += 1
            stream.ended = "OK"  # the server ended the stream: not expected here
        except grpc.aio.AioRpcError as error:
            if not self.cancelling:
                stream.ended = error.code().name
        except asyncio.CancelledError:
            if not self.cancelling:
                stream.ended = "CANCELLED"
            raise
        finally:
            stream.done = True
            if not settled:
                self.failed[stream.ended or "CANCELLED"] += 1
                self._settle(stream, established=False)

    def _change(
        self, stream: _Stream, change: events_pb2.AvailabilityChanged, now_ms: float
    ) -> None:
        key = (change.key.location_id, change.key.sku_id)
        last = stream.versions.get(key, 0)
        if change.version <= last:
            stream.backwards += 1
            return
        stream.versions[key] = change.version
        if stream.snapshot_versions is None:
            return
        stream.skipped += change.version - last - 1
        stream.changes += 1
        self.reasons[change.reason] += 1
        if change.committed_at_ms:
            lag_ms = now_ms - change.committed_at_ms
            _record(self.lag, lag_ms)
            stream.lag_max_ms = max(stream.lag_max_ms, lag_ms)
        stream.receipts.append((key[0], key[1], change.version, now_ms))

    @staticmethod
    def _snapshot(stream: _Stream, snapshot: events_pb2.Snapshot) -> None:
        for level in snapshot.levels:
            key = (level.key.location_id, level.key.sku_id)
            last = stream.versions.get(key, 0)
            if level.version < last:
                stream.backwards += 1
                continue
            if stream.snapshot_versions is not None:
                stream.skipped += level.version - last  # a resync jumped over them
            stream.versions[key] = level.version

    async def ramp(self) -> Ready:
        started_s = time.monotonic()
        per = max(1, self.spec.streams_per_channel)
        channels = [
            grpc.aio.insecure_channel(self.spec.address, options=CHANNEL_OPTIONS)
            for _ in range(math.ceil(len(self.streams) / per))
        ]
        self.channels = channels
        self.tasks = [
            asyncio.ensure_future(self.follow(stream, channels[position // per]))
            for position, stream in enumerate(self.streams)
        ]
        if self.streams:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.spec.ramp_timeout_s):
                    await self._all_settled.wait()
        leftover = self.established % self._report_every
        if leftover:
            self.conn.send(("established", leftover))
        failed = dict(self.failed)
        pending = len(self.streams) - self._settled
        if pending:
            failed["RAMP_TIMEOUT"] = pending
        return Ready(
            self.established,
            failed,
            time.monotonic() - started_s,
            self.snapshot_latency.encode().decode("ascii"),
        )

    def _missed(self, stream: _Stream, truth: dict[KeyId, int]) -> int:
        return sum(1 for key, version in truth.items() if stream.versions.get(key, 0) != version)

    async def converge(self, truth: Truth) -> tuple[bool, float]:
        started_s = time.monotonic()
        deadline_s = started_s + truth.converge_timeout_s
        while True:
            behind = [
                s
                for s in self.streams
                if not s.done and self._missed(s, truth.versions.get(s.merchant, {}))
            ]
            if not behind:
                return True, time.monotonic() - started_s
            if time.monotonic() >= deadline_s:
                return False, time.monotonic() - started_s
            await asyncio.sleep(CONVERGE_POLL_S)

    async def finish(self, truth: Truth) -> Result:
        converged, converge_s = await self.converge(truth)
        if truth.idle_s > 0:
            await asyncio.sleep(truth.idle_s)
        alive = {s.index: not s.done and s.snapshot_versions is not None for s in self.streams}
        results = [self._result(s, truth, alive[s.index]) for s in self.streams]
        ack_lag = new_histogram()
        negative = unmatched = 0
        for stream in self.streams:
            for location, sku, version, received_ms in stream.receipts:
                acked_ms = truth.acks.get((stream.merchant, location, sku, version))
                if acked_ms is None:
                    unmatched += 1
                    continue
                if received_ms < acked_ms:
                    negative += 1
                _record(ack_lag, received_ms - acked_ms)
        await self.close()
        return Result(
            streams=results,
            lag=self.lag.encode().decode("ascii"),
            ack_lag=ack_lag.encode().decode("ascii"),
            ack_lag_negative=negative,
            ack_lag_unmatched=unmatched,
            reasons=dict(self.reasons),
            converged=converged,
            converge_s=converge_s,
            cpu_s=_own_cpu_s(),
        )

    def _result(self, stream: _Stream, truth: Truth, alive: bool) -> StreamResult:
        final = truth.versions.get(stream.merchant, {})
        base = stream.snapshot_versions or {}
        expected = sum(max(v - base.get(k, 0), 0) for k, v in final.items())
        return StreamResult(
            index=stream.index,
            merchant=stream.merchant,
            established=stream.snapshot_versions is not None,
            alive=alive,
            ended=stream.ended,
            snapshot_s=stream.snapshot_s,
            changes=stream.changes,
            expected=expected,
            skipped=stream.skipped,
            backwards=stream.backwards,
            heartbeats=stream.heartbeats,
            resyncs=stream.resyncs,
            missed_keys=self._missed(stream, final),
            lag_max_ms=stream.lag_max_ms,
        )

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = self.cancelling = True
        for stream in self.streams:
            if stream.call is not None:
                stream.call.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


def _own_cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


async def _recv(conn: Connection) -> tuple[str, Any]:
    message: tuple[str, Any] = await asyncio.to_thread(conn.recv)
    return message


async def _child(conn: Connection, spec: ChildSpec) -> None:
    group = _Group(spec, conn)
    conn.send(("started", None))
    kind, _ = await _recv(conn)  # "go": every child is up, the ramp starts together
    if kind != "go":
        return
    try:
        ready = await group.ramp()
        conn.send(("ready", ready))
        kind, payload = await _recv(conn)
        if kind != "truth":
            return
        conn.send(("result", await group.finish(payload)))
    finally:
        await group.close()


def child_main(conn: Connection, spec: ChildSpec) -> None:
    """The child process's entry point (``multiprocessing`` spawn target)."""
    try:
        uvloop.run(_child(conn, spec))
    except BaseException as error:
        with contextlib.suppress(OSError):
            conn.send(("error", repr(error)))
        raise
    finally:
        conn.close()
