"""One typed configuration, read from flags with environment fallbacks.

Every setting has a flag and an ``INVENTORY_*`` variable; flags win. Processes started by
``inventory up`` get theirs as flags, so ``ps`` shows how each one runs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

ENVIRONMENT_PREFIX = "INVENTORY_"


@dataclass(frozen=True, slots=True)
class ShardConfig:
    shard_id: str
    listen: str
    database_url: str
    partition_count: int
    log_level: str


def env(name: str, default: str) -> str:
    return os.environ.get(ENVIRONMENT_PREFIX + name, default)


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard-id",
        default=env("SHARD_ID", "shard-0"),
        help="stable identity of this shard on the ring [INVENTORY_SHARD_ID]",
    )
    parser.add_argument(
        "--listen",
        default=env("LISTEN", "127.0.0.1:50061"),
        help="host:port to serve gRPC on [INVENTORY_LISTEN]",
    )
    add_database_argument(parser)
    parser.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="[INVENTORY_LOG_LEVEL]",
    )


def add_database_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--database-url",
        default=env("DATABASE_URL", ""),
        required=required and not env("DATABASE_URL", ""),
        help="PostgreSQL DSN [INVENTORY_DATABASE_URL]",
    )


def shard_config(options: argparse.Namespace) -> ShardConfig:
    from inventory_core import PARTITION_COUNT

    return ShardConfig(
        shard_id=options.shard_id,
        listen=options.listen,
        database_url=options.database_url,
        partition_count=PARTITION_COUNT,
        log_level=options.log_level,
    )
