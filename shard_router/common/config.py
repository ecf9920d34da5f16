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
    # The address others reach this shard at (default: the listen host and bound port).
    advertise: str = ""
    # A shard whose heartbeat is older than this is considered dead and its partitions move.
    # Must exceed a few heartbeat periods (0.5 s) plus a database hiccup.
    membership_lease_s: float = 3.0
    # Where availability changes are published (streams + read view); none: not published.
    redis_url: str = ""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    listen: str
    database_url: str
    partition_count: int
    log_level: str
    membership_lease_s: float = 3.0
    # The read view and event streams (EVENTUAL reads, Watch); none: STRONG reads only.
    redis_url: str = ""


def router_config(options: argparse.Namespace) -> RouterConfig:
    from inventory_core import PARTITION_COUNT

    return RouterConfig(
        listen=options.listen,
        database_url=options.database_url,
        partition_count=PARTITION_COUNT,
        log_level=options.log_level,
        membership_lease_s=options.membership_lease_s,
        redis_url=options.redis_url,
    )


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=env("ROUTER_LISTEN", "127.0.0.1:50051"),
        help="host:port of the public API [INVENTORY_ROUTER_LISTEN]",
    )
    add_database_argument(parser)
    add_redis_argument(parser)
    add_lease_argument(parser)
    add_log_level_argument(parser)


def add_redis_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=env("REDIS_URL", ""),
        help="Redis for availability events and the read view [INVENTORY_REDIS_URL]",
    )


def add_lease_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--membership-lease-s",
        type=float,
        default=float(env("MEMBERSHIP_LEASE_S", "3.0")),
        help="heartbeat age after which a shard counts as dead [INVENTORY_MEMBERSHIP_LEASE_S]",
    )


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="[INVENTORY_LOG_LEVEL]",
    )


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
    parser.add_argument(
        "--advertise",
        default=env("ADVERTISE", ""),
        help="address routers use to reach this shard [INVENTORY_ADVERTISE]",
    )
    add_lease_argument(parser)
    add_database_argument(parser)
    add_redis_argument(parser)
    add_log_level_argument(parser)


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
        advertise=options.advertise,
        membership_lease_s=options.membership_lease_s,
        redis_url=options.redis_url,
    )
