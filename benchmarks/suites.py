"""The targets a run can measure, which of them share a server, and the named suites.

Kept free of heavy imports: ``inventory --help`` builds the ``bench`` arguments from it.

Targets, by what they start (every server on loopback, every database fresh):

- ``router-unary``   the service as deployed: a router in front of ``--shards`` shards (2),
                     one plain unary gRPC call per operation;
- ``router-client``  the same cluster through ``shard_router.client.InventoryClient`` with
                     automatic batching (what an order-service team would run);
- ``service-batch``  the same cluster through the raw ``Batch`` stream (many calls per
                     message, sent by the harness's own driver);
- ``shard-unary``    one shard called directly (no router), unary calls;
- ``postgres``       the textbook PostgreSQL reservation (asyncpg pool);
- ``redis`` / ``redis-durable``  a Redis Lua script, as usually deployed / appendfsync always;
- ``echo-unary`` / ``echo-batch``  the bare gRPC ceiling of one Python process.

The three cluster targets share one cluster (one loaded catalogue, one cumulative ledger,
one audit per target over everything done so far); ``--service-address`` replaces that
cluster with an already running service.
"""

from __future__ import annotations

from typing import Any

from .workloads import WORKLOADS

TARGETS = (
    "router-unary",
    "router-client",
    "service-batch",
    "shard-unary",
    "postgres",
    "redis",
    "redis-durable",
    "echo-unary",
    "echo-batch",
)
# This service, by each path to it; the report compares these with the others.
SERVICE_TARGETS = ("router-unary", "router-client", "service-batch", "shard-unary")
BASELINES = ("postgres", "redis", "redis-durable")
# The echo ceiling each service target is compared with (same call style).
CEILING_OF = {
    "router-unary": "echo-unary",
    "shard-unary": "echo-unary",
    "router-client": "echo-batch",
    "service-batch": "echo-batch",
}
# Targets of one group share one server (started once, stopped after the group's last target).
GROUP_OF = {
    "router-unary": "cluster",
    "router-client": "cluster",
    "service-batch": "cluster",
    "shard-unary": "shard",
    "postgres": "postgres",
    "redis": "redis",
    "redis-durable": "redis-durable",
    "echo-unary": "echo",
    "echo-batch": "echo",
}
# How the load generator calls each gRPC target.
KIND_OF = {
    "router-unary": "grpc-unary",
    "router-client": "grpc-client",
    "service-batch": "grpc-batch",
    "shard-unary": "grpc-unary",
    "echo-unary": "grpc-unary",
    "echo-batch": "grpc-batch",
}

# Named comparisons: the defaults of a run (any flag given explicitly wins).
SUITES: dict[str, dict[str, Any]] = {
    # Issue 4: every workload against every target, ratios to the baselines and the ceiling.
    "default": {
        "targets": list(TARGETS),
        "workloads": list(WORKLOADS),
        "concurrency": [1, 8, 64],
        "keys": 1_000_000,
        "duration_s": 10.0,
        "warmup_s": 2.0,
    },
    # Issue 3: the three ways to the service side by side, reservations of 1-line carts.
    "paths": {
        "targets": ["router-unary", "router-client", "shard-unary"],
        "workloads": ["cart-1"],
        "concurrency": [1, 64, 256],
        "keys": 100_000,
        "duration_s": 5.0,
        "warmup_s": 2.0,
    },
}
SUITE_DEFAULT = "default"
