"""TLS and mutual TLS on every hop, by configuration (DESIGN section 12).

A server given a certificate and its key speaks TLS only; given a client CA as well, it asks
every caller for a certificate that chains to that CA and ends the handshake of one that
has none (mutual TLS). A refused caller gets UNAVAILABLE and its call reaches no servicer,
health checks included. Every channel of a hop (client to router, router to shard, ``inventory
up``'s health checks) comes from one ``ChannelFactory``, so plaintext or TLS is decided in one
place: no CA, plaintext; a CA, TLS; a certificate and key as well, the caller's side of
mutual TLS.

Rules:
  1. Files are checked at start: unreadable, not PEM, a key that is not its certificate's,
     a certificate outside its validity, each is a ``TLSSetupError`` whose text is one line
     naming the flag (the process exits 2, as for its auth setup).
  2. Files are read again when they change (looked at once per
     ``FILES_REFRESH_INTERVAL_S`` at most), so a rotated certificate needs no restart. A
     server's (its certificate, its key and its client CA) come through gRPC's dynamic
     credentials, which ask at every handshake, so new connections get them. A caller's
     are taken by its next channel: the router keeps one channel per shard address, so a
     rotated router certificate is presented from a shard's next new channel (or the
     router's next start). A change is taken only once it passes the checks of rule 1:
     until then the previous files are served (a rotation half-written, the new
     certificate before its key, is never served) and the refusal is logged once.
  3. Certificates name the host a caller dials: a shard's must hold the address it
     advertises (an IP address or a DNS name in its subjectAltName).
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .config import ChannelTLSConfig, ServerTLSConfig

log = structlog.get_logger(__name__)
T = TypeVar("T")

# How often a certificate's files are looked at for a change, at most (one stat each).
FILES_REFRESH_INTERVAL_S = 1.0
SERVER_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca")
ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"


class TLSSetupError(ValueError):
    """A TLS configuration that cannot run; ``str()`` is one line naming the flag."""


# (flag, path) of each file, and what the files hold, by flag.
Files = Sequence[tuple[str, str]]
Contents = dict[str, bytes]


class _Reloading(Generic[T]):
    """What ``load`` makes of some files, made again when one of them changes (rule 2)."""

    def __init__(self, files: Files, load: Callable[[Contents], T]) -> None:
        self._files = files
        self._load = load
        self._lock = threading.Lock()  # gRPC may ask from its own threads
        self._looked_at = time.monotonic()
        self._stamps = self._stamp()
        self.current = load(self._read())

    def refresh(self) -> T | None:
        """The new value when the files changed and pass the checks; else None."""
        with self._lock:
            now = time.monotonic()
            if now - self._looked_at < FILES_REFRESH_INTERVAL_S:
                return None
            self._looked_at = now
            try:
                stamps = self._stamp()
                if stamps == self._stamps:
                    return None
                self._stamps = stamps  # a refused change is logged once, not per handshake
                value = self._load(self._read())
            except TLSSetupError as error:
                log.error("tls_files_refused", error=str(error), detail="the previous are kept")
                return None
            log.info("tls_files_reloaded", files=[path for _, path in self._files])
            self.current = value
            return value

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for flag, path in self._files:
            try:
                status = os.stat(path)
            except OSError as error:
                raise TLSSetupError(f"{flag}: cannot read {path}: {error.strerror}") from None
            stamps.append((status.st_ino, status.st_mtime_ns, status.st_size))
        return tuple(stamps)

    def _read(self) -> Contents:
        contents: Contents = {}
        for flag, path in self._files:
            try:
                with open(path, "rb") as file:
                    contents[flag] = file.read()
            except OSError as error:
                raise TLSSetupError(f"{flag}: cannot read {path}: {error.strerror}") from None
        return contents


def _certificates(flag: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSetupError(f"{flag}: {path} holds no PEM certificate") from None


def _check_pair(files: Files, contents: Contents) -> None:
    """The certificate (flag and path first in ``files``) is in its validity and the key
    (second) is its own."""
    (cert_flag, cert_path), (key_flag, key_path) = files[:2]
    leaf = _certificates(cert_flag, cert_path, contents[cert_flag])[0]
    try:
        key = serialization.load_pem_private_key(contents[key_flag], password=None)
    except (ValueError, TypeError):
        message = f"{key_flag}: {key_path} holds no PEM private key (or it has a passphrase)"
        raise TLSSetupError(message) from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != leaf.public_key().public_bytes(*public):
        raise TLSSetupError(
            f"{key_flag}: {key_path} is not the key of the certificate in {cert_flag} {cert_path}"
        )
    now = datetime.datetime.now(datetime.UTC)
    if now < leaf.not_valid_before_utc:
        when = leaf.not_valid_before_utc
        raise TLSSetupError(f"{cert_flag}: {cert_path} is not valid before {when:{ISO_UTC}}")
    if now > leaf.not_valid_after_utc:
        when = leaf.not_valid_after_utc
        raise TLSSetupError(f"{cert_flag}: {cert_path} expired at {when:{ISO_UTC}}")


# --- servers --------------------------------------------------------------------------------


def server_credentials(config: ServerTLSConfig) -> grpc.ServerCredentials | None:
    """What a server binds with: None (plaintext) without a certificate; else TLS, mutual
    with a client CA, its files read again when they change. ``TLSSetupError`` (rule 1)."""
    problem = config.problem()
    if problem is not None:
        raise TLSSetupError(problem)
    if not config.cert_path:
        return None
    paths = (config.cert_path, config.key_path, config.client_ca_path)
    files = [(flag, path) for flag, path in zip(SERVER_FLAGS, paths, strict=True) if path]
    mutual = bool(config.client_ca_path)

    def load(contents: Contents) -> grpc.ServerCertificateConfiguration:
        _check_pair(files, contents)
        client_ca = None
        if mutual:
            ca_flag, ca_path = files[2]
            _certificates(ca_flag, ca_path, contents[ca_flag])
            client_ca = contents[ca_flag]
        pair = (contents[files[1][0]], contents[files[0][0]])
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)

    reloading = _Reloading(files, load)
    return grpc.dynamic_ssl_server_credentials(
        reloading.current, reloading.refresh, require_client_authentication=mutual
    )


def server_mode(config: ServerTLSConfig) -> str:
    """How callers reach a server, for its log line: plaintext, tls or mutual_tls."""
    if not config.cert_path:
        return "plaintext"
    return "mutual_tls" if config.client_ca_path else "tls"


# --- callers --------------------------------------------------------------------------------


class ChannelFactory:
    """Every channel of one hop: plaintext without a CA, else TLS (mutual with a certificate
    and key), each new channel with the files as they are then. ``TLSSetupError`` at once
    for a configuration that cannot run (rule 1)."""

    def __init__(self, config: ChannelTLSConfig | None = None) -> None:
        config = config or ChannelTLSConfig()
        problem = config.problem()
        if problem is not None:
            raise TLSSetupError(problem)
        self.tls = bool(config.ca_path)
        self._reloading: _Reloading[grpc.ChannelCredentials] | None = None
        if not self.tls:
            return
        ca_flag, cert_flag, key_flag = config.flags
        pair = [(cert_flag, config.cert_path), (key_flag, config.key_path)]
        own = pair if config.cert_path else []
        files = [*own, (ca_flag, config.ca_path)]

        def load(contents: Contents) -> grpc.ChannelCredentials:
            _certificates(ca_flag, config.ca_path, contents[ca_flag])
            if own:
                _check_pair(own, contents)
            return grpc.ssl_channel_credentials(
                root_certificates=contents[ca_flag],
                private_key=contents.get(key_flag),
                certificate_chain=contents.get(cert_flag),
            )

        self._reloading = _Reloading(files, load)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext; else the credentials of the files as they are now."""
        if self._reloading is None:
            return None
        self._reloading.refresh()
        return self._reloading.current

    def open(self, address: str, options: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, credentials, options=options)

    def open_blocking(
        self, address: str, options: Sequence[tuple[str, int | str]] = ()
    ) -> grpc.Channel:
        """A synchronous channel (``inventory up``'s health checks of its children)."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, credentials, options=options)
