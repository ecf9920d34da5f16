"""The real system as child processes: shards and a router on free loopback ports.

``python -m shard_router shard ...`` and ``python -m shard_router router ...`` are black boxes
here: a process, an address, a log file. Each process writes its JSON log (structlog, one
object a line) to ``<log_dir>/<name>.log``; the harness keeps these files (the stats lines'
``loop_stall_max_ms`` goes into the report, see ``benchmarks.service_logs``) and asks for a
stats line every ``stats_interval_s`` through ``INVENTORY_STATS_INTERVAL_S`` (a setting's
environment fallback, by the service's convention; a service that does not read it logs at
its own period, which the report shows). A process is ready when the standard gRPC health
service answers SERVING (called by its method path with raw bytes, so that the harness needs
no health stubs); a router is ready once a call routed through it is answered, i.e. it has
read the membership and opened its streams to the shards.

``Cluster.start`` starts the first shard (it migrates the database), then the others, then
the router, each bounded by ``PROCESS_READY_TIMEOUT_S``; ``stop`` stops them in reverse order
(SIGTERM, then SIGKILL after ``PROCESS_STOP_TIMEOUT_S``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from .targets.redis_lua import free_port

# A shard answers health checks within this long of starting (migration, recovery included).
PROCESS_READY_TIMEOUT_S = 60.0
PROCESS_STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.1
# After every shard serves: time for the first shard to see the others on the ring and hand
# their partitions over (shards poll membership every 0.5 s), so phases start settled.
SETTLE_S = 1.5
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
# HealthCheckResponse{status: SERVING}: field 1, varint 1.
HEALTH_SERVING = b"\x08\x01"
# The environment variable of the service's stats period (see the module docstring).
STATS_INTERVAL_ENVIRONMENT = "INVENTORY_STATS_INTERVAL_S"


class ServiceProcess:
    """One shard or router child process."""

    def __init__(
        self,
        role: str,
        name: str,
        database_url: str,
        log_dir: Path,
        lease_s: float,
        *,
        redis_url: str = "",
        stats_interval_s: float | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.role = role
        self.name = name
        self.address = f"127.0.0.1:{free_port()}"
        self._database_url = database_url
        self._redis_url = redis_url  # events and the read view; none: not published
        self._log_path = log_dir / f"{name}.log"
        self._lease_s = lease_s
        self._stats_interval_s = stats_interval_s  # None: the service's own period
        self._extra = list(extra)  # more options for its command line
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def arguments(self) -> list[str]:
        common = [
            "--listen", self.address,
            "--database-url", self._database_url,
            "--membership-lease-s", str(self._lease_s),
            "--redis-url", self._redis_url,
            # The harness's clients present no token (what checking tokens costs is
            # measured apart: docs/security.md).
            "--no-auth",
        ]  # fmt: skip
        if self.role == "shard":
            return ["shard", "--shard-id", self.name, *common, *self._extra]
        # The harness decides which keys are split (its hot-key workload measures one owner
        # and split keys side by side): the router never splits one by itself here.
        return ["router", *common, "--hot-key-threshold-per-s", "0", *self._extra]

    def start(self) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ)
        if self._stats_interval_s is not None:
            environment[STATS_INTERVAL_ENVIRONMENT] = f"{self._stats_interval_s:g}"
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "shard_router", *self.arguments()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    def wait_ready(self) -> None:
        assert self._process is not None
        deadline_s = time.monotonic() + PROCESS_READY_TIMEOUT_S
        with grpc.insecure_channel(self.address) as channel:
            check = channel.unary_unary(HEALTH_CHECK_METHOD)
            while time.monotonic() < deadline_s:
                if self._process.poll() is not None:
                    break
                with contextlib.suppress(grpc.RpcError):
                    if check(b"", timeout=1.0) == HEALTH_SERVING:
                        return
                time.sleep(POLL_INTERVAL_S)
        raise RuntimeError(f"{self.name} did not serve on {self.address}; log: {self._log_path}")

    def wait_routes(self) -> None:
        """Until a call through this process is answered (any answer but UNAVAILABLE)."""
        deadline_s = time.monotonic() + PROCESS_READY_TIMEOUT_S
        probe = pb.GetAvailabilityRequest(
            keys=[pb.InventoryKey(merchant_id="probe", sku_id="probe", location_id="probe")]
        )
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            while time.monotonic() < deadline_s:
                try:
                    stub.GetAvailability(probe, timeout=2.0)
                    return
                except grpc.RpcError as error:
                    if error.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        return
                time.sleep(POLL_INTERVAL_S)
        raise RuntimeError(f"{self.name} on {self.address} routes no call; log: {self._log_path}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(PROCESS_STOP_TIMEOUT_S)


class Cluster:
    """``shards`` shard processes, and a router in front of them when ``router`` is True."""

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        *,
        shards: int,
        router: bool,
        lease_s: float,
        name: str = "bench",
        redis_url: str = "",
        stats_interval_s: float | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError("a cluster needs at least one shard")

        def process(role: str, process_name: str) -> ServiceProcess:
            return ServiceProcess(
                role,
                process_name,
                database_url,
                log_dir,
                lease_s,
                redis_url=redis_url,
                stats_interval_s=stats_interval_s,
            )

        self.shards = [process("shard", f"{name}-shard-{i}") for i in range(shards)]
        self.router = process("router", f"{name}-router") if router else None

    @property
    def address(self) -> str:
        """Where clients call: the router, else the (first) shard."""
        return self.router.address if self.router is not None else self.shards[0].address

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def labelled(self) -> dict[str, ServiceProcess]:
        """Each process by the label the report shows: ``router``, ``shard-0``, ..."""
        labels = {"router": self.router} if self.router is not None else {}
        return {**labels, **{f"shard-{i}": shard for i, shard in enumerate(self.shards)}}

    @property
    def processes(self) -> list[ServiceProcess]:
        return [*self.shards, *([self.router] if self.router is not None else [])]

    @property
    def description(self) -> str:
        shards = f"{len(self.shards)} shard{'s' if len(self.shards) > 1 else ''}"
        return f"router + {shards}" if self.router is not None else shards

    def start(self) -> None:
        try:
            first, *others = self.shards
            first.start()
            first.wait_ready()  # the first shard migrates the database
            for shard in others:
                shard.start()
            for shard in others:
                shard.wait_ready()
            if others:
                time.sleep(SETTLE_S)
            if self.router is not None:
                self.router.start()
                self.router.wait_ready()
            for process in self.processes:
                if process.role == "router" or len(self.shards) == 1:
                    process.wait_routes()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
