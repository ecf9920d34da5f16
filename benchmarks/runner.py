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

The load generator is one process (``--generator-processes 1``: the harness's own) or
several (``run_worker`` in each of a pool). Either way a phase starts in two steps, so that
every process measures the same window and the harness can sample CPU at its edges: each
process opens its client, collects and freezes its heap (``GcPauses``), writes its pid into
its ``ready`` slot and waits; the harness then writes one start time (Unix seconds) into
``go[0]`` and every process begins its warm-up at that moment.

Nothing grows in a generator process while it runs: every reservation's outcome goes to the
process's ledger file (``LedgerWriter``), latencies into fixed-size HDR histograms.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .gc_pauses import GcPauses
from .histograms import Recorder
from .ledger import LedgerEntry, LedgerWriter
from .targets import OK, UNKNOWN_FATE_CODES, Answer, Client, TargetSpec, open_client
from .workloads import Catalogue, FollowUp, Generator, Kind, Operation

# Operations in flight in one open-loop generator process; beyond it they are counted, not sent.
OPEN_LOOP_IN_FLIGHT_MAX = 10_000
CLIENT_SATURATED = "CLIENT_SATURATED"
# Connections of a pooled client (the baselines) in an open-loop phase.
OPEN_LOOP_CONNECTIONS = 64
# How often a ready generator process looks for the start time, and how long it waits for
# it (the harness waits for every process to be ready, a spawn included, well within this).
START_POLL_INTERVAL_S = 0.005
START_WAIT_S_MAX = 120.0


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


@dataclass
class WorkerResult:
    """One generator process's share of a phase (small and picklable)."""

    histograms: dict[str, tuple[str, dict[str, int]]]
    measured_s: float
    cpu_s: float = 0.0  # this process's CPU over the whole phase, setup included
    pid: int = 0
    worker: int = 0
    ledger_entries: int = 0  # lines written to its ledger file
    gc: dict[str, Any] = field(default_factory=dict)  # GcPauses.figures()
    measure_from_unix_s: float = 0.0
    measure_to_unix_s: float = 0.0


class _Run:
    """The state of one phase in one process."""

    def __init__(
        self,
        phase: Phase,
        client: Client,
        *,
        worker: int,
        progress: MutableSequence[int],
        ledger: LedgerWriter,
        start: float,
    ) -> None:
        self.phase = phase
        self.client = client
        self.worker = worker
        self.progress = progress
        self.ledger = ledger
        self.generator = Generator(
            phase.workload, phase.catalogue, phase.seed * 1000 + worker, phase.index, phase.zipf_s
        )
        self.recorder = Recorder()
        self.sequence = itertools.count()
        self.measured = 0
        self.start = start
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
            self.ledger.write(LedgerEntry("", lines, "unknown-reserve", expires_after_s))
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
        self.ledger.write(LedgerEntry(answer.reservation_id, lines, fate, expires_after_s))

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


def share(total: int, worker: int, workers: int) -> int:
    """Worker ``worker``'s part of ``total`` callers: the parts differ by at most one."""
    return total // workers + (1 if worker < total % workers else 0)


async def run_phase(
    spec: TargetSpec,
    phase: Phase,
    *,
    worker: int,
    workers: int,
    progress: MutableSequence[int],
    ready: MutableSequence[int],
    go: MutableSequence[float],
    ledger_path: Path,
) -> WorkerResult:
    """This process's share of ``phase``: concurrency and rate are split over ``workers``.

    Ready (``ready[worker] = pid``) once its client is open and its heap frozen; starts its
    warm-up at ``go[0]`` (Unix seconds) once the harness has written it.
    """
    process = psutil.Process()
    cpu_before = process.cpu_times()
    concurrency = share(phase.concurrency, worker, workers)
    # Open loop: calls in flight are not bounded by callers; size connection pools as
    # a client service would (callers queue for a connection rather than fail).
    connections = concurrency if phase.mode == "closed" else OPEN_LOOP_CONNECTIONS
    client = await open_client(spec, max(1, connections))
    ledger = LedgerWriter(ledger_path)
    try:
        with GcPauses() as pauses:
            start = await _wait_for_go(worker, ready, go)
            run = _Run(phase, client, worker=worker, progress=progress, ledger=ledger, start=start)
            pauses.measure_from, pauses.measure_to = run.measure_from, run.end
            if phase.mode == "closed":
                await _closed(run, concurrency)
            else:
                await run.open_loop(phase.rate_per_s / workers)
            measured_to = min(time.monotonic(), run.end)
            pauses.measure_to = measured_to
    finally:
        ledger.close()
        await client.close()
    cpu_after = process.cpu_times()
    unix_offset = time.time() - time.monotonic()
    return WorkerResult(
        histograms=run.recorder.encoded(),
        measured_s=max(1e-9, measured_to - run.measure_from),
        cpu_s=(cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system),
        pid=os.getpid(),
        worker=worker,
        ledger_entries=ledger.entries,
        gc=pauses.figures(),
        measure_from_unix_s=run.measure_from + unix_offset,
        measure_to_unix_s=measured_to + unix_offset,
    )


async def _wait_for_go(
    worker: int, ready: MutableSequence[int], go: MutableSequence[float]
) -> float:
    """Say ready, wait for the start time; return it on this process's monotonic clock."""
    ready[worker] = os.getpid()
    deadline = time.monotonic() + START_WAIT_S_MAX
    while go[0] == 0.0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"generator process {worker}: no start within {START_WAIT_S_MAX} s")
        await asyncio.sleep(START_POLL_INTERVAL_S)
    start = time.monotonic() + (go[0] - time.time())
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    return start


async def _closed(run: _Run, concurrency: int) -> None:
    async def one_task() -> None:
        while not run.done(time.monotonic()):
            await run.execute(run.generator.next(), time.monotonic())

    await asyncio.gather(*(one_task() for _ in range(concurrency)))


# ----------------------------------------------------------------- generator processes

_shared: tuple[MutableSequence[int], MutableSequence[int], MutableSequence[float]] | None = None


def init_worker(
    progress: MutableSequence[int], ready: MutableSequence[int], go: MutableSequence[float]
) -> None:
    """Pool initializer: the shared arrays (progress and ready: one slot per process; go:
    the start time of the phase under way, 0 until the harness writes it)."""
    global _shared  # noqa: PLW0603 (set once per worker process)
    _shared = (progress, ready, go)


def run_worker(
    spec: TargetSpec, phase: Phase, worker: int, workers: int, ledger_path: str
) -> WorkerResult:
    """Entry point in a generator process (``ProcessPoolExecutor``)."""
    assert _shared is not None, "init_worker did not run"
    progress, ready, go = _shared
    return asyncio.run(
        run_phase(
            spec,
            phase,
            worker=worker,
            workers=workers,
            progress=progress,
            ready=ready,
            go=go,
            ledger_path=Path(ledger_path),
        )
    )
