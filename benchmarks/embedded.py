"""The PostgreSQL server of a run: the one ``--database-url`` names, else an embedded one.

With no ``--database-url`` the harness starts PostgreSQL from the ``pgserver`` wheel in a
temporary directory (unix socket only, no TCP port), so ``inventory bench`` runs on a laptop
with nothing installed, and stops it and deletes the directory at the end. Either way every
stateful target gets a fresh database of its own on that server (``create_database``), dropped
at the end (``drop_database``).

pgserver quirks (as in the service's own launcher): it is imported late, because importing it
touches the file system and warns when ``XDG_RUNTIME_DIR`` is unset (that warning is
silenced); run as root it creates an OS user ``pgserver`` and opens the data directory's
ancestors to it; its stop is ``pg_ctl -w stop``, after which we wait, bounded, for the
postmaster to exit and escalate to SIGQUIT then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import asyncpg

# After pgserver's own stop returned: how long the postmaster may take to exit.
POSTGRES_STOP_TIMEOUT_S = 10.0
# After SIGQUIT (immediate shutdown) or SIGKILL.
POSTGRES_KILL_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.05


class EmbeddedPostgres:
    """pgserver's PostgreSQL in a temporary directory, deleted by ``stop``."""

    def __init__(self) -> None:
        self._server: Any = None  # pgserver.PostgresServer (untyped library)
        self._directory: Path | None = None
        self.url = ""
        self.pid: int | None = None

    def start(self) -> str:
        """Start the server; return its DSN (database ``postgres``)."""
        if self._server is not None:
            raise RuntimeError("EmbeddedPostgres already started")
        self._directory = Path(tempfile.mkdtemp(prefix="inventory-bench-pg-"))
        pgserver = _import_pgserver()
        self._server = pgserver.get_server(self._directory / "data", cleanup_mode="stop")
        self.pid = self._server.get_pid()
        self.url = str(self._server.get_uri())
        return self.url

    def stop(self) -> None:
        """Stop the server (bounded) and delete its directory; idempotent."""
        server, self._server = self._server, None
        directory, self._directory = self._directory, None
        pid, self.pid = self.pid, None
        try:
            if server is not None:
                server.cleanup()  # pg_ctl -w stop (fast shutdown)
            if pid is not None and not _wait_for_exit(pid, POSTGRES_STOP_TIMEOUT_S):
                for stop_signal in (signal.SIGQUIT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, stop_signal)
                    if _wait_for_exit(pid, POSTGRES_KILL_TIMEOUT_S):
                        break
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)


def _import_pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver

    return pgserver


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (a daemon reparented to an init that never reaps)
    counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline_s = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() >= deadline_s:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def with_database(url: str, database: str) -> str:
    """``url`` naming ``database`` instead of its own."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


async def create_database(server_url: str, database: str) -> str:
    """Create the empty database ``database`` on the server of ``server_url``; its DSN."""
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()
    return with_database(server_url, database)


async def drop_database(server_url: str, database: str) -> None:
    """Drop ``database`` (its sessions are terminated first: the servers are stopped)."""
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await connection.close()
