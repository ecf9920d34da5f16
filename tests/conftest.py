"""Shared fixtures: a PostgreSQL server, a fresh database per test, shard processes.

PostgreSQL is the machine's when ``INVENTORY_TEST_DATABASE_URL`` names one (CI reruns the
``pg`` tests that way), else an embedded server from the pgserver wheel, started once per
session in a temporary directory. Every test that writes gets a database of its own.
"""

from __future__ import annotations

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
    import asyncio

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ShardProcess:
    """A real shard process on loopback that tests can kill -9 and restart."""

    database_url: str
    log_dir: Path
    shard_id: str = "shard-0"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        with (self.log_dir / f"{self.shard_id}.{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shard_router", "shard", "--shard-id", self.shard_id,
                 "--listen", self.address, "--database-url", self.database_url],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_healthy(self.address, self.process)

    def kill(self) -> None:
        """kill -9: no shutdown path runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(PROCESS_STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(PROCESS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


def wait_healthy(address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + PROCESS_READY_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
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
def shard(database_url: str, tmp_path: Path) -> Iterator[ShardProcess]:
    process = ShardProcess(database_url, tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()
