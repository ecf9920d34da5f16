"""The ``inventory`` command: ``up``, ``shard``, ``migrate``.

``inventory up`` is the one-command run: with no ``--database-url`` (or
INVENTORY_DATABASE_URL) it starts an embedded PostgreSQL whose data lives in ``--data-dir``
(default ``.inventory/``, kept across restarts), then the shard process, prints where it
listens and stays in the foreground until Ctrl-C, then stops everything in order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common.config import add_database_argument, add_shard_arguments, env, shard_config

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
    add_database_argument(up, required=False)
    up.set_defaults(run=_up)

    shard = commands.add_parser("shard", help="run one shard process (owns partitions)")
    add_shard_arguments(shard)
    shard.set_defaults(run=_shard)

    migrate = commands.add_parser("migrate", help="apply schema migrations and exit")
    add_database_argument(migrate)
    migrate.set_defaults(run=_migrate)

    options = parser.parse_args(argv)
    options.run(options)


def _shard(options: argparse.Namespace) -> None:
    from .shard.main import main as shard_main

    shard_main(shard_config(options))


def _migrate(options: argparse.Namespace) -> None:
    import asyncpg

    from persistence.migrate import migrate

    async def run() -> list[int]:
        connection = await asyncpg.connect(options.database_url)
        try:
            return await migrate(connection)
        finally:
            await connection.close()

    applied = asyncio.run(run())
    print(f"migrations applied: {applied or 'none (up to date)'}")


def _up(options: argparse.Namespace) -> None:
    from persistence.embedded import EmbeddedPostgres

    data_dir = Path(options.data_dir).resolve()
    embedded = EmbeddedPostgres()
    database_url = options.database_url
    if not database_url:
        print(f"starting embedded PostgreSQL (data in {data_dir / 'postgres'}) ...", flush=True)
        database_url = embedded.start(data_dir / "postgres")
    listen = f"127.0.0.1:{options.port}"
    shard = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shard_router",
            "shard",
            "--shard-id",
            "shard-0",
            "--listen",
            listen,
            "--database-url",
            database_url,
        ],
    )
    try:
        _wait_ready(listen, shard)
        print(f"inventory service listening on {listen} (Ctrl-C to stop)", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        shard.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(shard)
        embedded.stop()
        print("stopped", flush=True)


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
