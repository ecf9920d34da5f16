"""The ``inventory`` command: ``up``, ``router``, ``shard``, ``migrate``.

``inventory up`` is the one-command run: with no ``--database-url`` (or
INVENTORY_DATABASE_URL) it starts an embedded PostgreSQL whose data lives in ``--data-dir``
(default ``.inventory/``, kept across restarts), then ``--shards`` shard processes (2 by
default) and one router, prints the router's address and stays in the foreground until
Ctrl-C; then it stops the router, the shards and the database, in that order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common.config import (
    add_database_argument,
    add_redis_argument,
    add_router_arguments,
    add_shard_arguments,
    env,
    router_config,
    shard_config,
)

# How long `up` waits for a process it started to answer health checks.
PROCESS_READY_TIMEOUT_S = 60.0
# How long a stopping process may take before it is killed.
PROCESS_STOP_TIMEOUT_S = 15.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inventory", description="Inventory service.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole system (embedded PostgreSQL by default)")
    up.add_argument(
        "--data-dir",
        default=env("DATA_DIR", ".inventory"),
        help="where embedded servers keep their data [INVENTORY_DATA_DIR]",
    )
    up.add_argument(
        "--port",
        type=int,
        default=int(env("PORT", "50051")),
        help="port of the public gRPC API on 127.0.0.1 [INVENTORY_PORT]",
    )
    up.add_argument(
        "--shards",
        type=int,
        default=int(env("SHARDS", "2")),
        help="number of shard processes [INVENTORY_SHARDS]",
    )
    add_database_argument(up, required=False)
    add_redis_argument(up)
    up.set_defaults(run=_up)

    router = commands.add_parser("router", help="run one router process (stateless front)")
    add_router_arguments(router)
    router.set_defaults(run=_router)

    shard = commands.add_parser("shard", help="run one shard process (owns partitions)")
    add_shard_arguments(shard)
    shard.set_defaults(run=_shard)

    migrate = commands.add_parser("migrate", help="apply schema migrations and exit")
    add_database_argument(migrate)
    migrate.set_defaults(run=_migrate)

    from benchmarks import add_subcommand, watch_load

    add_subcommand(commands)  # `inventory bench ...`: the load harness (black box over gRPC)
    events = commands.add_parser(
        "bench-events",
        help="measure event lag and concurrent watchers (python -m benchmarks.watch_load)",
    )
    watch_load.add_arguments(events)
    events.set_defaults(run=watch_load.run)

    options = parser.parse_args(argv)
    options.run(options)


def _shard(options: argparse.Namespace) -> None:
    from .shard.main import main as shard_main

    shard_main(shard_config(options))


def _router(options: argparse.Namespace) -> None:
    from .router.main import main as router_main

    router_main(router_config(options))


def _migrate(options: argparse.Namespace) -> None:
    from persistence.connections import migrate_database

    applied = asyncio.run(migrate_database(options.database_url))
    print(f"migrations applied: {applied or 'none (up to date)'}")


def _up(options: argparse.Namespace) -> None:
    from persistence.embedded import EmbeddedPostgres, EmbeddedRedis

    if options.shards < 1:
        raise SystemExit("--shards must be at least 1")
    data_dir = Path(options.data_dir).resolve()
    processes: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:  # unwinds in reverse: processes, Redis, PostgreSQL
        database_url = options.database_url
        if not database_url:
            print(f"starting embedded PostgreSQL (data in {data_dir / 'postgres'}) ...", flush=True)
            database_url = stack.enter_context(EmbeddedPostgres()).start(data_dir / "postgres")
        redis_url = options.redis_url
        if not redis_url:
            print(f"starting embedded Redis (data in {data_dir / 'redis'}) ...", flush=True)
            redis_url = stack.enter_context(EmbeddedRedis()).start(data_dir / "redis")
        _migrate(argparse.Namespace(database_url=database_url))
        stack.callback(_stop_all, processes)
        stores = ["--database-url", database_url, "--redis-url", redis_url]
        try:
            for index in range(options.shards):
                listen = f"127.0.0.1:{options.port + 10 + index}"
                shard = _spawn("shard", "--shard-id", f"shard-{index}", "--listen", listen, *stores)
                processes.append(shard)
                _wait_ready(listen, shard)
                print(f"shard-{index} serving on {listen}", flush=True)
            listen = f"127.0.0.1:{options.port}"
            router = _spawn("router", "--listen", listen, *stores)
            processes.append(router)
            _wait_ready(listen, router)
            print(f"inventory service listening on {listen} (router; Ctrl-C to stop)", flush=True)
            signal.signal(signal.SIGTERM, _raise_interrupt)
            while all(p.poll() is None for p in processes):
                time.sleep(0.5)
            print("a process exited; stopping the rest", flush=True)
        except KeyboardInterrupt:
            pass
    print("stopped", flush=True)


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in reversed(processes):  # router first, then the shards
        _stop(process)


def _spawn(*arguments: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shard_router", *arguments])


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _wait_ready(address: str, process: subprocess.Popen[bytes]) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + PROCESS_READY_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"process exited with {process.returncode} before serving")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"{address} did not become healthy in {PROCESS_READY_TIMEOUT_S} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
