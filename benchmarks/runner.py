"""One phase of load: a workload at one concurrency (closed loop) or rate (open loop).

Closed loop: ``concurrency`` tasks each send an operation, wait for its answer, send the next.
Open loop: operation i is due at ``start + i / rate``; it is sent then whatever is in flight
(up to ``OPEN_LOOP_IN_FLIGHT_MAX``; beyond it the operation is counted under the code
``CLIENT_SATURATED`` and not sent) and its latency is measured from when it was due, so a
server that falls behind shows its queueing in the figures.

Both loops stop at the first of: warm-up plus duration elapsed, ``count_max`` measured
operations. Operations started during the warm-up are executed and enter the ledger (they
change state) but not the histograms. Each operation is bounded by the call timeout, so a
phase ends within its duration plus one timeout.

``run_worker`` is the entry point in each client process; with ``--client-processes 1``
the phase runs in the harness's own process.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import MutableSequence
from dataclasses import dataclass, field

import psutil

from .histograms import Recorder
from .targets import OK, UNKNOWN_FATE_CODES, Answer, Client, TargetSpec, open_client
from .workloads import Catalogue, FollowUp, Generator, Key, Kind, Operation

# Operations in flight in one open-loop client process; beyond it they are counted, not sent.
OPEN_LOOP_IN_FLIGHT_MAX = 10_000
CLIENT_SATURATED = "CLIENT_SATURATED"
# Connections of a pooled client (the baselines) in an open-loop phase.
OPEN_LOOP_CONNECTIONS = 64


@dataclass(frozen=True)
class Phase:
    index: int
    workload: str
    mode: str  # "closed" | "open"
    concurrency: int  # closed loop: tasks; open loop: unused
    rate_per_s: float  # open loop: arrivals per second; closed loop: unused
    duration_s: float
    warmup_s: float
    count_max: int
    seed: int
    zipf_s: float
    catalogue: Catalogue
    run_tag: str

    @property
    def load_label(self) -> str:
        return f"C={self.concurrency}" if self.mode == "closed" else f"R={self.rate_per_s:g}/s"


@dataclass(frozen=True)
class LedgerEntry:
    """What the client saw of one reservation. ``fate`` is one of FATES."""

    reservation_id: str  # "" when the reserve's own fate is unknown
    lines: tuple[tuple[Key, int], ...]
    fate: str
    expires_after_s: float  # wall clock: after this the server may have expired it


FATES = ("active", "committed", "released", "unknown-reserve", "unknown-finish")


@dataclass
class WorkerResult:
    histograms: dict[str, tuple[str, dict[str, int]]]
    measured_s: float
    ledger: list[LedgerEntry] = field(default_factory=list)
    cpu_s: float = 0.0
    pid: int = 0


class _Run:
    """The state of one phase in one process."""

    def __init__(
        self, phase: Phase, client: Client, worker: int, progress: MutableSequence[int]
    ) -> None:
        self.phase = phase
        self.client = client
        self.worker = worker
        self.progress = progress
        self.generator = Generator(
            phase.workload, phase.catalogue, phase.seed * 1000 + worker, phase.index, phase.zipf_s
        )
        self.recorder = Recorder()
        self.ledger: list[LedgerEntry] = []
        self.sequence = itertools.count()
        self.measured = 0
        self.start = time.monotonic()
        self.measure_from = self.start + phase.warmup_s
        self.end = self.measure_from + phase.duration_s

    def done(self, now: float) -> bool:
        return now >= self.end or self.measured >= self.phase.count_max

    def record(self, kind: str, started: float, answer: Answer, measuring: bool) -> None:
        if measuring:
            self.recorder.record(kind, time.monotonic() - started, answer.code)

    async def execute(self, operation: Operation, started: float) -> None:
        measuring = started >= self.measure_from
        if measuring:
            self.measured += 1
            self.progress[self.worker] += 1
        if operation.kind is Kind.READ:
            self.record("read", started, await self.client.read(operation.keys), measuring)
            return
        number = next(self.sequence)
        tag = f"{self.phase.run_tag}-p{self.phase.index}-w{self.worker}-{number}"
        lines = tuple((key, operation.quantity) for key in operation.keys)
        expires_after_s = time.time() + operation.ttl_s
        answer = await self.client.reserve(lines, operation.ttl_s, tag)
        self.record("reserve", started, answer, measuring)
        if answer.code in UNKNOWN_FATE_CODES:
            self.ledger.append(LedgerEntry("", lines, "unknown-reserve", expires_after_s))
            return
        if answer.code != OK:
            return
        fate = "active"
        if operation.follow_up in (FollowUp.COMMIT, FollowUp.RELEASE):
            commit = operation.follow_up is FollowUp.COMMIT
            call = self.client.commit if commit else self.client.release
            follow_started = time.monotonic()
            finished = await call(operation.keys[0], answer.reservation_id, tag + "-f")
            self.record("commit" if commit else "release", follow_started, finished, measuring)
            if finished.code == OK:
                fate = "committed" if commit else "released"
            else:
                fate = "unknown-finish"
        self.ledger.append(LedgerEntry(answer.reservation_id, lines, fate, expires_after_s))

    async def open_loop(self, rate_per_s: float) -> None:
        interval_s = 1.0 / rate_per_s
        in_flight: set[asyncio.Task[None]] = set()
        for number in itertools.count():
            due = self.start + number * interval_s
            if self.done(due):
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            operation = self.generator.next()
            if len(in_flight) >= OPEN_LOOP_IN_FLIGHT_MAX:
                if due >= self.measure_from:
                    self.recorder.record(operation.kind.value, 0.0, CLIENT_SATURATED)
                continue
            task = asyncio.create_task(self.execute(operation, due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)


async def run_phase(
    spec: TargetSpec,
    phase: Phase,
    worker: int,
    workers: int,
    progress: MutableSequence[int],
) -> WorkerResult:
    """This process's share of ``phase``: concurrency and rate are split over ``workers``."""
    process = psutil.Process()
    cpu_before = process.cpu_times()
    concurrency = phase.concurrency // workers + (1 if worker < phase.concurrency % workers else 0)
    # Open loop: calls in flight are not bounded by callers; size connection pools as
    # a client service would (callers queue for a connection rather than fail).
    connections = concurrency if phase.mode == "closed" else OPEN_LOOP_CONNECTIONS
    client = await open_client(spec, max(1, connections))
    try:
        run = _Run(phase, client, worker, progress)
        if phase.mode == "closed":
            await _closed(run, concurrency)
        else:
            await run.open_loop(phase.rate_per_s / workers)
        measured_s = max(1e-9, min(time.monotonic(), run.end) - run.measure_from)
    finally:
        await client.close()
    cpu_after = process.cpu_times()
    return WorkerResult(
        histograms=run.recorder.encoded(),
        measured_s=measured_s,
        ledger=run.ledger,
        cpu_s=(cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system),
        pid=os.getpid(),
    )


async def _closed(run: _Run, concurrency: int) -> None:
    async def one_task() -> None:
        while not run.done(time.monotonic()):
            await run.execute(run.generator.next(), time.monotonic())

    await asyncio.gather(*(one_task() for _ in range(concurrency)))


# ----------------------------------------------------------------- client processes

_progress_slots: MutableSequence[int] | None = None


def init_worker(slots: MutableSequence[int]) -> None:
    """Pool initializer: the shared progress counters (one slot per worker)."""
    global _progress_slots  # noqa: PLW0603 (set once per worker process)
    _progress_slots = slots


def run_worker(spec: TargetSpec, phase: Phase, worker: int, workers: int) -> WorkerResult:
    """Entry point in a client process (``ProcessPoolExecutor``)."""
    slots: MutableSequence[int] = _progress_slots if _progress_slots is not None else [0] * workers
    return asyncio.run(run_phase(spec, phase, worker, workers, slots))
