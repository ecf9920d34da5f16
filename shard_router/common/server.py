"""gRPC server bootstrap shared by shard and router: health, reflection, orderly stop."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# Messages larger than this are refused: a 1000-key batch answer is ~100 KiB.
MESSAGE_BYTES_MAX = 4 * 1024 * 1024
# In-flight RPCs per process; beyond it gRPC answers RESOURCE_EXHAUSTED.
CONCURRENT_RPCS_MAX = 20_000


def create_server(
    listen: str, service_names: Sequence[str]
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A server with health (NOT_SERVING until ``set_serving``) and reflection; returns the port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, health_servicer, port


async def set_serving(
    health_servicer: health.aio.HealthServicer, names: Sequence[str], serving: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *names]:
        await health_servicer.set(name, status)
