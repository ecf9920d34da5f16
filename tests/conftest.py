"""Shared fixtures: a PostgreSQL server, a fresh database per test, shard processes.

PostgreSQL is the machine's when ``INVENTORY_TEST_DATABASE_URL`` names one (CI reruns the
``pg`` tests that way), else an embedded server from the pgserver wheel, started once per
session in a temporary directory. Every test that writes gets a database of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

# A shard answers health checks within this long of starting (recovery included).
PROCESS_READY_TIMEOUT_S = 60.0
PROCESS_STOP_TIMEOUT_S = 15.0


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    configured = os.environ.get("INVENTORY_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    from persistence.embedded import EmbeddedPostgres

    directory = Path(tempfile.mkdtemp(prefix="inv-pg-"))
    server = EmbeddedPostgres()
    try:
        yield server.start(directory / "data")
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def with_database(url: str, database: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@pytest.fixture
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A new, empty database on the test server, dropped afterwards."""
    with fresh_database(postgres_server_url) as url:
        yield url


@contextlib.contextmanager
def fresh_database(postgres_server_url: str) -> Iterator[str]:
    """A new, empty database on the server (a module's fixture may hold one too)."""
    name = "inv_test_" + secrets.token_hex(6)

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(postgres_server_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield with_database(postgres_server_url, name)
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@contextlib.contextmanager
def embedded_redis() -> Iterator[str]:
    """An embedded Redis in a temporary directory, for as long as the block runs: its URL."""
    from persistence.embedded import EmbeddedRedis

    directory = Path(tempfile.mkdtemp(prefix="inv-test-redis-"))
    redis = EmbeddedRedis()
    try:
        yield redis.start(directory)
    finally:
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServiceProcess:
    """A real shard or router process on loopback that tests can kill -9, stop and restart."""

    database_url: str
    log_dir: Path
    role: str = "shard"
    shard_id: str = "shard-0"
    port: int = field(default_factory=free_port)
    lease_s: float = 3.0
    redis_url: str = ""
    # More flags of this process (a shard's --feed-stale-after-s, say).
    extra_arguments: tuple[str, ...] = ()
    # How it checks its callers: none, unless a test says otherwise (tests/security run
    # them with --auth-keys and tokens; everything else tests what the calls do).
    auth_arguments: tuple[str, ...] = ("--no-auth",)
    # What its health checks connect with: plaintext unless a test runs it with TLS.
    health_credentials: grpc.ChannelCredentials | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return self.shard_id if self.role == "shard" else "router"

    def arguments(self) -> list[str]:
        common = [
            "--listen",
            self.address,
            "--database-url",
            self.database_url,
            "--membership-lease-s",
            str(self.lease_s),
            "--redis-url",
            self.redis_url,
            *self.auth_arguments,
        ]
        if self.role == "shard":
            return ["shard", "--shard-id", self.shard_id, *common, *self.extra_arguments]
        return ["router", *common, *self.extra_arguments]

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        with (self.log_dir / f"{self.name}.{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shard_router", *self.arguments()],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            wait_healthy(self.address, self.process, self.health_credentials)

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9: no shutdown path runs."""
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(PROCESS_STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process cannot stop
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(PROCESS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        logs = sorted(self.log_dir.glob(f"{self.name}.*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)


ShardProcess = ServiceProcess


def wait_healthy(
    address: str,
    process: subprocess.Popen[bytes],
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Until ``address`` answers SERVING, over TLS with ``credentials`` (else plaintext)."""
    deadline = time.monotonic() + PROCESS_READY_TIMEOUT_S
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before serving")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{address} not healthy after {PROCESS_READY_TIMEOUT_S} s")


@pytest.fixture
def shard(database_url: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess(database_url, tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@dataclass
class Cluster:
    shards: list[ServiceProcess]
    router: ServiceProcess

    def stop(self) -> None:
        for process in [self.router, *self.shards]:
            process.stop()


def start_cluster(
    database_url: str,
    log_dir: Path,
    *,
    shards: int,
    lease_s: float = 2.0,
    redis_url: str = "",
    shard_arguments: tuple[str, ...] = (),
    router_arguments: tuple[str, ...] = (),
    auth_arguments: tuple[str, ...] = ("--no-auth",),
) -> Cluster:
    """Shards first (the first one migrates), then the router once all have joined."""
    members = [
        ServiceProcess(
            database_url,
            log_dir,
            shard_id=f"shard-{i}",
            lease_s=lease_s,
            redis_url=redis_url,
            extra_arguments=shard_arguments,
            auth_arguments=auth_arguments,
        )
        for i in range(shards)
    ]
    members[0].start()
    for member in members[1:]:
        member.start(wait=False)
    for member in members[1:]:
        assert member.process is not None
        wait_healthy(member.address, member.process, member.health_credentials)
    router = ServiceProcess(
        database_url,
        log_dir,
        role="router",
        lease_s=lease_s,
        redis_url=redis_url,
        extra_arguments=router_arguments,
        auth_arguments=auth_arguments,
    )
    router.start()
    return Cluster(members, router)
