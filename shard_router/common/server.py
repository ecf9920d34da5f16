"""gRPC server bootstrap shared by shard and router: health, reflection, orderly stop.

A process checks its listen address before anything else (``check_listen_address``) and
``create_server`` checks it again when gRPC binds; either failure is a ``ListenError``, which
the process's ``main`` reports in one line and turns into ``LISTEN_FAILED_EXIT_CODE``, so
that ``inventory up`` can tell "the port is taken" from a crash.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .decoding import RequestDecoding

# Messages larger than this are refused: a 1000-key batch answer is ~100 KiB.
MESSAGE_BYTES_MAX = 4 * 1024 * 1024
# In-flight RPCs per process; beyond it gRPC answers RESOURCE_EXHAUSTED.
CONCURRENT_RPCS_MAX = 20_000
# Exit code of a shard or router that could not listen on its address (1 is a crash, 2 a
# usage error): `inventory up` turns it into a one-line message naming the port.
LISTEN_FAILED_EXIT_CODE = 3


class ListenError(Exception):
    """The process cannot listen on ``address``; ``str()`` is the one-line reason."""

    def __init__(self, address: str, reason: str, in_use: bool) -> None:
        super().__init__(f"{address} {reason}")
        self.address = address
        self.in_use = in_use


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError when malformed."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def check_listen_address(address: str) -> None:
    """Raise ``ListenError`` when nothing could listen on ``address`` right now.

    A probe bind with SO_REUSEADDR, as gRPC binds: a port in TIME_WAIT passes, a port with a
    listener fails. Port 0 (any free port) always passes. There is a race with whoever binds
    next; ``create_server`` reports that case the same way.
    """
    try:
        host, port = split_address(address)
    except ValueError as error:
        raise ListenError(address, "is not host:port", in_use=False) from error
    if port == 0:
        return
    try:
        candidates = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ListenError(
            address, f"has an unknown host ({error.strerror})", in_use=False
        ) from error
    failures: list[OSError] = []
    for family, kind, protocol, _, socket_address in candidates:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(socket_address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ListenError(address, "is already in use", in_use=True) from error
                failures.append(error)
    if len(failures) == len(candidates):  # gRPC serves when at least one address binds
        first = failures[0]
        reason = f"cannot be listened on ({first.strerror or first})"
        raise ListenError(address, reason, in_use=False) from first


def create_server(
    listen: str,
    service_names: Sequence[str],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    observers: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A server with health (NOT_SERVING until ``set_serving``) and reflection, TLS with
    ``credentials`` (shard_router.common.tls; plaintext without); returns the port.

    Its calls pass through ``observers`` (metrics: they see every call, its request never
    read), then the refusal of bytes that are no request (shard_router.common.decoding),
    then ``interceptors``, which may read the request (tracing, authentication)."""
    server = grpc.aio.server(
        interceptors=[*observers, RequestDecoding(), *interceptors],
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
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as error:  # grpc >= 1.5x raises instead of returning 0
        check_listen_address(listen)  # names the reason when it still holds
        raise ListenError(listen, "cannot be listened on (gRPC bind failed)", False) from error
    if port == 0:
        check_listen_address(listen)
        raise ListenError(listen, "cannot be listened on (gRPC bind failed)", in_use=False)
    return server, health_servicer, port


def run_server(serve: Callable[[], Coroutine[Any, Any, None]], listen: str) -> None:
    """Run a process's ``serve`` on uvloop, its listen address checked first.

    A ``ListenError`` becomes one line on stderr and ``LISTEN_FAILED_EXIT_CODE``; a Ctrl-C
    before ``serve`` installed its stop handlers (start-up) exits 130 without a traceback.
    """
    try:
        check_listen_address(listen)
        uvloop.run(serve())
    except ListenError as error:
        print(f"error: {error} (--listen)", file=sys.stderr, flush=True)
        raise SystemExit(LISTEN_FAILED_EXIT_CODE) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


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
