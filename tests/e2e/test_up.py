"""``inventory up`` as a user runs it: a stop request at any moment leaves nothing behind.

Each test runs ``python -m shard_router up`` with a data directory of its own, so with its
own embedded PostgreSQL and Redis, on free loopback ports. "Nothing behind" means: every
process that was ``up``'s descendant when the signal was sent is gone, the PostgreSQL and
Redis of the pid files in the data directory are gone, and no process names the data
directory on its command line. A zombie counts as gone: a daemonised postmaster is
reparented to PID 1, which in a container may never reap it.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e]

# The whole start: an embedded PostgreSQL's first start (initdb) takes 5-20 s on a shared
# 2-core machine, each shard a few seconds more.
START_TIMEOUT_S = 120.0
# `up`'s own clean-up is bounded (15 s per group of children, then Redis and PostgreSQL).
EXIT_TIMEOUT_S = 120.0
# After `up` exited, how long its former descendants get to disappear.
GONE_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
PORT_ATTEMPTS_MAX = 50


def _free_port_run(count: int) -> int:
    """A port p with the count - 1 after it free too (two shards; the metrics of three
    processes)."""
    for _ in range(PORT_ATTEMPTS_MAX):
        first = free_port()
        try:
            for extra in range(1, count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", first + extra))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


class Up:
    """One ``inventory up`` process; its stdout lines arrive in a queue (a reader thread)."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.shard_ports = _free_port_run(2)
        self.metrics_ports = _free_port_run(3)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "shard_router", "up"),
                *("--data-dir", str(data_dir), "--port", str(self.port)),
                *("--shard-ports", str(self.shard_ports)),
                *("--metrics-ports", str(self.metrics_ports), *extra),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout_s: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"up exited before {text!r}:\n{self.output()}")
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout_s} s:\n{self.output()}")

    def exit_code(self) -> int:
        code = self.process.wait(EXIT_TIMEOUT_S)
        self._reader.join(EXIT_TIMEOUT_S)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return code

    def output(self) -> str:
        log = self.data_dir / "logs" / "inventory.log"
        logged = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        return "".join(self.lines) + f"\n--- end of {log} ---\n{logged}"

    def tree(self) -> list[psutil.Process]:
        """``up``, its descendants and the postmaster (a daemon: not a descendant)."""
        processes = [psutil.Process(self.process.pid)]
        with contextlib.suppress(psutil.NoSuchProcess):
            processes += processes[0].children(recursive=True)
        postmaster = _pid_in(self.data_dir / "postgres" / "postmaster.pid")
        if postmaster is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(postmaster)
                processes += [parent, *parent.children(recursive=True)]
        return processes

    def kill(self) -> None:
        """Only if a test failed half-way: do not leave `up` running."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(EXIT_TIMEOUT_S)


def _pid_in(pidfile: Path) -> int | None:
    """The pid of a pid file; PostgreSQL writes -pid for a standalone backend (initdb)."""
    try:
        pid = abs(int(pidfile.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None
    return pid or None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _naming(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(data_dir) in part for part in process.info["cmdline"] or []) and _alive(process):
            found.append(process)
    return found


def _tree_with(up: Up, name: str, timeout_s: float) -> list[psutil.Process]:
    """``up.tree()`` once a process in it has ``name`` on its command line."""
    deadline = time.monotonic() + timeout_s
    while True:
        tree = up.tree()
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                if name in " ".join(process.cmdline()):
                    return tree
        if time.monotonic() > deadline:
            raise AssertionError(f"no {name} process within {timeout_s} s:\n{up.output()}")
        time.sleep(POLL_INTERVAL_S)


def _assert_nothing_left(up: Up, tree: list[psutil.Process]) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    leftovers: list[psutil.Process] = []
    while time.monotonic() < deadline:
        leftovers = [p for p in tree if _alive(p)]
        leftovers += _naming(up.data_dir)
        for pidfile in ("postgres/postmaster.pid", "redis/redis.pid"):
            pid = _pid_in(up.data_dir / pidfile)
            if pid is not None and psutil.pid_exists(pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if _alive(psutil.Process(pid)):
                        leftovers.append(psutil.Process(pid))
        if not leftovers:
            return
        time.sleep(POLL_INTERVAL_S * 10)
    described = []
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            described.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
    for process in leftovers:  # clean up for the next tests, then fail
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    raise AssertionError("left running:\n" + "\n".join(described) + "\n" + up.output())


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "inventory"


def _wait_for_a_process_naming(data_dir: Path, timeout_s: float) -> None:
    """Until initdb or postgres runs on ``data_dir`` (best effort: a fast start may finish
    before we look, and the test then still checks the clean-up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not _naming(data_dir):
        time.sleep(POLL_INTERVAL_S)


def test_sigterm_during_the_embedded_postgres_start_leaves_nothing_behind(
    data_dir: Path,
) -> None:
    up = Up(data_dir)
    try:
        up.wait_for("starting embedded PostgreSQL")
        _wait_for_a_process_naming(data_dir / "postgres", timeout_s=20.0)
        tree = up.tree()
        up.process.send_signal(signal.SIGTERM)
        assert up.exit_code() == 0, up.output()
    finally:
        up.kill()
    _assert_nothing_left(up, tree)
    text = "".join(up.lines)
    print(text)  # shows whether the signal came during the start (it usually does)
    assert "SIGTERM received" in text and "stopped" in text, text
    assert "shard-0" not in text, text  # nothing was started after the signal


def test_sigterm_while_the_shards_start_leaves_nothing_behind(data_dir: Path) -> None:
    up = Up(data_dir)
    try:
        up.wait_for("shard-0 serving")
        tree = _tree_with(up, "shard-1", timeout_s=30.0)  # spawned just after that line
        up.process.send_signal(signal.SIGTERM)
        assert up.exit_code() == 0, up.output()
    finally:
        up.kill()
    _assert_nothing_left(up, tree)
    assert "listening on" not in "".join(up.lines)


def test_sigterm_once_up_stops_everything_and_keeps_json_logs_off_the_terminal(
    data_dir: Path,
) -> None:
    up = Up(data_dir)
    try:
        up.wait_for(f"listening on 127.0.0.1:{up.port}")
        metrics = up.wait_for("metrics (Prometheus): ")
        urls = [f"http://127.0.0.1:{up.metrics_ports + i}/metrics" for i in range(3)]
        assert metrics.endswith(f"router {urls[0]}, shard-0 {urls[1]}, shard-1 {urls[2]}\n"), (
            metrics
        )
        for url in urls:
            with urllib.request.urlopen(url, timeout=30) as answer:
                assert b"inventory_grpc_calls_total{" in answer.read()
        tree = up.tree()
        names = " ".join(" ".join(p.cmdline()) for p in tree if _alive(p))
        assert "router" in names and "shard-1" in names and "redis-server" in names
        up.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert up.exit_code() == 0, up.output()
    finally:
        up.kill()
    _assert_nothing_left(up, tree)
    assert not [line for line in up.lines if line.lstrip().startswith("{")], up.output()
    assert all(line[:4].isdigit() and line[19] == "Z" for line in up.lines), up.lines
    log = (data_dir / "logs" / "inventory.log").read_text()
    assert '"event": "shard_serving"' in log or '"event":"shard_serving"' in log
    assert f"{data_dir / 'logs' / 'inventory.log'}" in up.lines[0]


@pytest.mark.parametrize("which", ["--port", "--shard-ports", "--metrics-ports"])
def test_a_taken_port_is_one_line_naming_it_and_exit_2(data_dir: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        answer = subprocess.run(
            [
                *(sys.executable, "-m", "shard_router", "up", "--data-dir", str(data_dir)),
                *(which, str(port)),
                *(("--port", str(free_port())) if which != "--port" else ()),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=START_TIMEOUT_S,
            check=False,
        )
    assert answer.returncode == 2, answer
    assert answer.stdout == ""
    assert answer.stderr == f"error: 127.0.0.1:{port} is already in use ({which})\n"
    assert not (data_dir / "postgres").exists()  # refused before anything started


@pytest.mark.parametrize("flag", ["--listen", "--metrics-listen"])
@pytest.mark.parametrize("role", ["shard", "router"])
def test_a_server_that_cannot_bind_says_so_in_one_line_with_its_own_exit_code(
    role: str, flag: str
) -> None:
    from shard_router.common.server import LISTEN_FAILED_EXIT_CODE

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        other = ("--listen", f"127.0.0.1:{free_port()}") if flag != "--listen" else ()
        answer = subprocess.run(
            [
                *(sys.executable, "-m", "shard_router", role, flag, address, *other),
                *("--database-url", "postgresql://nobody@127.0.0.1:1/none", "--no-auth"),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=START_TIMEOUT_S,
            check=False,
        )
    assert answer.returncode == LISTEN_FAILED_EXIT_CODE, answer
    assert answer.stderr == f"error: {address} is already in use ({flag})\n"
