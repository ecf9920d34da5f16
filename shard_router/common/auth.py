"""Authentication and access on every call: the server interceptor, and a caller's token.

``AuthInterceptor`` is the one place a server checks its callers (DESIGN section 12). For
every call but health and reflection it reads the ``authorization`` metadata, verifies the
token (shard_router.common.tokens; cached per token) and then:

  - a unary call (every ``rpcs.UNARY`` row) is checked against the access table with its
    request (shard_router.common.access) before the servicer sees it;
  - ``AvailabilityStream.Watch`` is checked with its filter, and ends UNAUTHENTICATED when
    its token expires;
  - ``Inventory.Batch`` and ``Ingest.Stream`` run with the stream's principal in
    ``access.caller``: the servicer checks each item (``access.guard_items``) and each
    request, so one item refused is that item's answer and the stream goes on;
  - any other method is refused: a call the table does not name is nobody's.

A refusal is UNAUTHENTICATED (no token, or a bad one) or PERMISSION_DENIED, from the error
table, and nothing reaches the servicer. The token never appears in a log line or an answer.

``TokenSource`` is the token a process presents (the router's to the shards, a client's to
the router): a fixed string, or a file read again when it changes, so a token can be
rotated without a restart.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import structlog
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

from . import access, errors, rpcs
from .calls import AUTHORIZATION_METADATA, BEARER, Continuation, abort
from .config import AuthConfig
from .tokens import (
    KEYS_REFRESH_INTERVAL_S,
    Keyring,
    KeyringError,
    TokenRefused,
    Verifier,
)

log = structlog.get_logger(__name__)

# Served to anyone: health checks (probes) and reflection (the API's shape, no data).
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_PACKAGE = pb.DESCRIPTOR.package
# The unary calls' paths, by the access table's name for them.
UNARY_CALLS: dict[str, str] = {
    f"/{_PACKAGE}.{rpc.service}/{rpc.method}": rpc.field for rpc in rpcs.UNARY
}
WATCH_METHOD = f"/{_PACKAGE}.AvailabilityStream/Watch"
STREAM_METHODS = frozenset({f"/{_PACKAGE}.Inventory/Batch", f"/{_PACKAGE}.Ingest/Stream"})
# A configuration that cannot run exits with this (argparse's usage error).
USAGE_EXIT_CODE = 2
# How often a token file is looked at for a change.
TOKEN_FILE_REFRESH_INTERVAL_S = 1.0


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier
        self.keyring = verifier.keyring
        # Calls refused for their token, and for their access (the stats line).
        self.unauthenticated = 0
        self.denied = 0

    async def intercept_service(
        self,
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        header = None
        for key, value in details.invocation_metadata or ():
            if key == AUTHORIZATION_METADATA:
                header = value if isinstance(value, str) else None
                break
        try:
            principal = self._verifier.principal(header)
        except TokenRefused as refused:
            self.unauthenticated += 1
            return _refusing(handler, errors.unauthenticated(str(refused)))
        call = UNARY_CALLS.get(method)
        if call is not None:
            return self._unary(handler, principal, call)
        if method == WATCH_METHOD:
            return self._watch(handler, principal)
        if method in STREAM_METHODS:
            return _with_caller(handler, principal)
        self.denied += 1
        return _refusing(handler, errors.permission_denied(f"{method} is served to no role"))

    def _unary(
        self, handler: grpc.RpcMethodHandler, principal: access.Principal, call: str
    ) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        assert behavior is not None, call

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            status = access.refusal(principal, call, request)
            if status is not None:
                self.denied += 1
                await abort(context, status)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, handler.request_deserializer, handler.response_serializer
        )

    def _watch(
        self, handler: grpc.RpcMethodHandler, principal: access.Principal
    ) -> grpc.RpcMethodHandler:
        behavior = handler.unary_stream
        assert behavior is not None

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            status = access.refusal(principal, access.WATCH, request)
            if status is not None:
                self.denied += 1
                await abort(context, status)
            async for event in behavior(request, context):
                stale = access.expired(principal)
                if stale is not None:  # resume with a fresh token and the last resume token
                    await abort(context, stale)
                yield event

        return grpc.unary_stream_rpc_method_handler(
            checked, handler.request_deserializer, handler.response_serializer
        )


def _with_caller(
    handler: grpc.RpcMethodHandler, principal: access.Principal
) -> grpc.RpcMethodHandler:
    behavior = handler.stream_stream
    assert behavior is not None

    async def with_caller(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # Each RPC runs in a task of its own, so the principal is this stream's alone (and
        # the tasks the stream starts copy it).
        access.caller.set(principal)
        async for response in behavior(requests, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(
        with_caller, handler.request_deserializer, handler.response_serializer
    )


def _refusing(handler: grpc.RpcMethodHandler, status: status_pb2.Status) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers every call with ``status``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context, status)

    serializers = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, *serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, *serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, *serializers)
    return grpc.stream_stream_rpc_method_handler(refuse, *serializers)


class AuthSetupError(Exception):
    """The process cannot check its callers as configured; ``str()`` names the flag."""


def open_guard(config: AuthConfig) -> AuthInterceptor | None:
    """The interceptor a process serves through, its keys read; None with ``--no-auth``
    (said in a warning line). ``AuthSetupError`` when the configuration cannot run."""
    problem = config.problem()
    if problem is not None:
        raise AuthSetupError(problem)
    if config.no_auth:
        return None
    try:
        keyring = Keyring(Path(config.keys_path))
    except (KeyringError, OSError) as error:
        raise AuthSetupError(f"--auth-keys: {error}") from None
    return AuthInterceptor(Verifier(keyring))


def start_auth(guard: AuthInterceptor | None) -> list[asyncio.Task[None]]:
    """Say in the log how callers are checked (a warning with ``--no-auth``; once the
    process is past its listen check, so a port in use stays a one-line error), and start
    the task that looks at the keys file once a period (keys added are accepted, keys
    removed refused)."""
    if guard is None:
        log.warning(
            "auth_disabled",
            detail="--no-auth: every caller can read, change and watch every merchant's stock",
        )
        return []
    keyring = guard.keyring
    log.info("auth_enabled", keys_path=str(keyring.path), keys=list(keyring.key_ids))
    return [asyncio.create_task(_refresh_keys(keyring))]


async def _refresh_keys(keyring: Keyring) -> None:
    while True:
        await asyncio.sleep(KEYS_REFRESH_INTERVAL_S)
        keyring.refresh()


def interceptors(guard: AuthInterceptor | None) -> list[grpc.aio.ServerInterceptor]:
    return [] if guard is None else [guard]


def exit_on_setup_error(error: Exception) -> NoReturn:
    """A setup error (auth, TLS: ``str()`` names the flag) as one line, exit 2."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT_CODE)


class TokenSource:
    """The token a process presents: ``token`` as given, or the contents of ``path``, read
    again (at most once a second) when the file changes. ``metadata()`` is what a call
    sends; empty when there is no token."""

    def __init__(self, token: str = "", path: Path | None = None) -> None:
        assert not (token and path), "a token or a file, not both"
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._looked_at = 0.0
        self._metadata: tuple[tuple[str, str], ...] = ()
        if token:
            self._metadata = ((AUTHORIZATION_METADATA, BEARER + token.strip()),)
        if path is not None:
            self._read()

    @classmethod
    def of(cls, token: str = "", path: str = "") -> TokenSource:
        return cls(token, Path(path)) if path else cls(token)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self._path is not None and time.monotonic() - self._looked_at >= (
            TOKEN_FILE_REFRESH_INTERVAL_S
        ):
            self._read()
        return self._metadata

    def _read(self) -> None:
        assert self._path is not None
        self._looked_at = time.monotonic()
        try:
            status = os.stat(self._path)
            stamp = (status.st_mtime_ns, status.st_size)
            if stamp == self._stamp:
                return
            token = self._path.read_text().strip()
        except OSError as error:
            if self._stamp is None:
                reason = f"cannot read the token file {self._path}: {error.strerror}"
                raise OSError(reason) from None
            log.error("token_file_unreadable", path=str(self._path), error=error.strerror)
            return
        self._stamp = stamp
        self._metadata = ((AUTHORIZATION_METADATA, BEARER + token),) if token else ()
