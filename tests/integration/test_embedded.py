"""The embedded servers keep their data across a stop and a start on the same directory."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from persistence import embedded
from persistence.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError


async def _execute(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _fetch_values(dsn: str, query: str) -> list[object]:
    connection = await asyncpg.connect(dsn)
    try:
        return [row[0] for row in await connection.fetch(query)]
    finally:
        await connection.close()


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """A directory outside pytest's tmp tree for PostgreSQL's data.

    PostgreSQL runs as the ``pgserver`` user when started as root, so every ancestor of its
    data directory must stay readable to that user; pytest resets its own tmp root to 0700
    at the start of every session (another session running meanwhile would lock PostgreSQL
    out mid-start), so the data lives in a directory of its own.
    """
    directory = Path(tempfile.mkdtemp(prefix="inv-embedded-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_embedded_postgres_keeps_rows_across_restart(server_dir: Path) -> None:
    data_dir = server_dir / "postgres"
    with EmbeddedPostgres() as postgres:
        dsn = postgres.start(data_dir)
        asyncio.run(_execute(dsn, "CREATE TABLE kept (sku text PRIMARY KEY)"))
        asyncio.run(_execute(dsn, "INSERT INTO kept VALUES ('apple')"))
    with pytest.raises(EmbeddedServerError):
        _ = postgres.dsn  # stopped

    with EmbeddedPostgres() as postgres:
        dsn = postgres.start(data_dir)
        assert asyncio.run(_fetch_values(dsn, "SELECT sku FROM kept")) == ["apple"]


def test_embedded_postgres_refuses_second_start_on_same_object(server_dir: Path) -> None:
    with EmbeddedPostgres() as postgres:
        postgres.start(server_dir / "postgres")
        with pytest.raises(EmbeddedServerError, match="already started"):
            postgres.start(server_dir / "other")


def test_embedded_redis_keeps_keys_across_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis with space"
    with EmbeddedRedis() as redis_server:
        url = redis_server.start(data_dir)
        assert url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(url)
        try:
            client.set("stock:apple", b"7")
        finally:
            client.close()
    assert not (data_dir / "redis.pid").exists()  # clean SHUTDOWN removes the pidfile

    with EmbeddedRedis() as redis_server:
        client = redis.Redis.from_url(redis_server.start(data_dir))
        try:
            assert client.get("stock:apple") == b"7"
        finally:
            client.close()


def test_embedded_redis_refuses_a_second_server_on_the_same_files(tmp_path: Path) -> None:
    with EmbeddedRedis() as first, EmbeddedRedis() as second:
        first.start(tmp_path / "redis")
        with pytest.raises(EmbeddedServerError, match="already running"):
            second.start(tmp_path / "redis")


class _CrashingInitdbOnce:
    """pgserver whose first initdb dies by SIGSEGV after leaving a partial data dir."""

    def __init__(self, real: object, crashes: int) -> None:
        self.real, self.crashes, self.calls = real, crashes, 0

    def get_server(self, data_dir: Path, cleanup_mode: str) -> object:
        self.calls += 1
        if self.crashes:
            self.crashes -= 1
            data_dir.mkdir(parents=True, exist_ok=True)
            (data_dir / "half-written").write_text("x")
            raise subprocess.CalledProcessError(-11, ["/x/bin/initdb", "-D", str(data_dir)])
        return self.real.get_server(data_dir, cleanup_mode=cleanup_mode)  # type: ignore[attr-defined]


def test_an_initdb_killed_by_a_signal_on_a_new_cluster_is_retried_once(
    server_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _CrashingInitdbOnce(embedded._import_pgserver(), crashes=1)
    monkeypatch.setattr(embedded, "_import_pgserver", lambda: fake)
    with EmbeddedPostgres() as postgres:
        assert postgres.start(server_dir / "postgres")
    assert fake.calls == 2
    assert not (server_dir / "postgres" / "half-written").exists()


def test_an_initdb_that_keeps_crashing_is_reported_not_retried_forever(
    server_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _CrashingInitdbOnce(embedded._import_pgserver(), crashes=5)
    monkeypatch.setattr(embedded, "_import_pgserver", lambda: fake)
    with pytest.raises(EmbeddedServerError, match="failed to start"):
        EmbeddedPostgres().start(server_dir / "postgres")
    assert fake.calls == embedded.POSTGRES_INITDB_ATTEMPTS_MAX
