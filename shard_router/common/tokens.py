"""Signed caller tokens (JWT): the keys that verify them, the verification, and minting.

A caller presents ``authorization: Bearer <JWT>`` in its call's metadata. The token is signed
by one of the keys of a JWKS file (``--auth-keys``) and names, besides ``exp`` and
``aud = "inventory"``:

    sub        who calls (logged, never the token itself)
    role       order_service, gateway, partner, admin or router (shard_router.common.access)
    merchants  the merchant ids it may act for; ["*"] for every merchant

``Keyring`` holds the JWKS file's keys and reads the file again when it changes
(``refresh``, once a second from the process's own task, and at once for a token whose
``kid`` it does not know): a key added to the file is accepted, and a key removed from it
refused, without a restart. Each key verifies only its own algorithm (EdDSA for an Ed25519
key, ES256 for a P-256 one, RS256 for RSA), so no token can choose another.

``Verifier`` caches each token it has checked, good or bad, up to ``VERIFIED_TOKENS_MAX``
tokens: a signature check costs ~170 us, a cached answer a dict lookup. A cached token is
still checked against its expiry on every call, and the cache is emptied whenever the
keyring changes.

``LocalKeys`` is the key directory ``inventory up`` makes in its data directory: one private
Ed25519 signing key and the JWKS file of the public keys that verify (``inventory keys
rotate`` adds one, ``inventory keys retire`` removes one), and ``mint`` signs tokens with it
(``inventory token``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from .access import EVERY_MERCHANT, Principal, Role
from .calls import BEARER

log = structlog.get_logger(__name__)

AUDIENCE = "inventory"
# Tokens checked (good or bad) that are remembered; past it the oldest is forgotten.
VERIFIED_TOKENS_MAX = 10_000
# A longer header value is refused without being parsed.
TOKEN_CHARS_MAX = 4096
# Merchants one token may name.
TOKEN_MERCHANTS_MAX = 1000
# Clock skew allowed between the token's issuer and this process.
LEEWAY_S = 30.0
# The keyring's file is looked at this often (and at once for an unknown kid, at most this
# often).
KEYS_REFRESH_INTERVAL_S = 1.0
# The claims every token must carry.
REQUIRED_CLAIMS = ("exp", "sub", "role", "merchants", "aud")


class TokenRefused(Exception):
    """The call's credentials are missing or not good; ``str()`` says why (never the token)."""


class KeyringError(Exception):
    """The JWKS file cannot be read or holds no usable key."""


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any
    algorithm: str


class Keyring:
    """The verification keys of a JWKS file, by ``kid``, read again when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, _Key] = {}
        self._stamp: tuple[int, int] | None = None
        self._looked_at = 0.0
        # +1 on every change of the keys (the verifier's cache is emptied on it).
        self.version = 0
        self._load()

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def key(self, kid: str) -> _Key | None:
        return self._keys.get(kid)

    def refresh(self, *, force: bool = False) -> bool:
        """Read the file again if it changed; ``True`` when the keys did. At most once per
        ``KEYS_REFRESH_INTERVAL_S`` unless ``force``. A file that became unreadable or bad
        keeps the keys as they were (and says so in the log)."""
        now = time.monotonic()
        if not force and now - self._looked_at < KEYS_REFRESH_INTERVAL_S:
            return False
        self._looked_at = now
        try:
            if self._file_stamp() == self._stamp:
                return False
            return self._load()
        except KeyringError as error:
            log.error("auth_keys_unreadable", path=str(self.path), error=str(error))
            return False

    def _file_stamp(self) -> tuple[int, int]:
        try:
            status = self.path.stat()
        except OSError as error:
            raise KeyringError(f"{self.path}: {error.strerror}") from None
        return status.st_mtime_ns, status.st_size

    def _load(self) -> bool:
        stamp = self._file_stamp()
        keys = parse_jwks(self.path.read_bytes(), str(self.path))
        self._stamp = stamp
        if keys == self._keys:
            return False
        added, removed = keys.keys() - self._keys.keys(), self._keys.keys() - keys.keys()
        first = not self._keys
        self._keys = keys
        self.version += 1
        if first:
            return True  # said by the process once it serves (auth.start_auth)
        log.info(
            "auth_keys_loaded",
            path=str(self.path),
            keys=sorted(keys),
            added=sorted(added),
            removed=sorted(removed),
        )
        return True


def parse_jwks(data: bytes, where: str = "JWKS") -> dict[str, _Key]:
    """The keys of a JWKS document by kid; ``KeyringError`` naming what is wrong."""
    try:
        document = json.loads(data)
        entries = document["keys"]
        assert isinstance(entries, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise KeyringError(f'{where}: not a JWKS document ({{"keys": [...]}})') from None
    keys: dict[str, _Key] = {}
    for index, entry in enumerate(entries):
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not kid:
            raise KeyringError(f"{where}: keys[{index}] has no kid")
        try:
            parsed = jwt.PyJWK.from_dict(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as error:
            raise KeyringError(f"{where}: keys[{index}] ({kid}): {error}") from None
        if parsed.algorithm_name not in ("EdDSA", "ES256", "RS256"):
            raise KeyringError(
                f"{where}: keys[{index}] ({kid}): algorithm {parsed.algorithm_name} is not "
                "accepted (EdDSA, ES256 or RS256)"
            )
        keys[kid] = _Key(parsed.key, parsed.algorithm_name)
    if not keys:
        raise KeyringError(f"{where}: holds no key")
    return keys


class Verifier:
    """Tokens to principals, through the keyring, with a bounded cache of answers."""

    def __init__(self, keyring: Keyring, clock: Callable[[], float] = time.time) -> None:
        self.keyring = keyring
        self._clock = clock
        self._answers: dict[str, Principal | str] = {}
        self._version = keyring.version
        # Signature checks made (cache misses), for the stats line.
        self.checks = 0

    def principal(self, header: str | None) -> Principal:
        """The caller of a call whose ``authorization`` metadata is ``header``; raises
        ``TokenRefused`` with the reason."""
        if not header:
            raise TokenRefused("no token: send 'authorization: Bearer <token>' metadata")
        if self._version != self.keyring.version:
            self._answers.clear()
            self._version = self.keyring.version
        answer = self._answers.get(header)
        if answer is None:
            answer = self._check(header)
            if len(self._answers) >= VERIFIED_TOKENS_MAX:
                del self._answers[next(iter(self._answers))]
            self._answers[header] = answer
        if isinstance(answer, str):
            raise TokenRefused(answer)
        if answer.expires_at <= self._clock():
            raise TokenRefused(f"the token of {answer.subject!r} has expired")
        return answer

    def _check(self, header: str) -> Principal | str:
        """The principal, or why the token is refused."""
        self.checks += 1
        if len(header) > TOKEN_CHARS_MAX:
            return f"the authorization metadata is longer than {TOKEN_CHARS_MAX} characters"
        if not header.startswith(BEARER):
            return "the authorization metadata is not 'Bearer <token>'"
        token = header[len(BEARER) :].strip()
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            return "the token is not a JWT"
        if not isinstance(kid, str) or not kid:
            return "the token names no signing key (kid)"
        key = self.keyring.key(kid)
        if key is None and self.keyring.refresh():
            key = self.keyring.key(kid)  # a key added since the last look
        if key is None:
            return f"the token's signing key {kid!r} is not one of this service's keys"
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=AUDIENCE,
                leeway=LEEWAY_S,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            return "the token has expired"
        except jwt.InvalidTokenError as error:
            return f"the token is not valid: {error}"
        return _principal(claims)


def _principal(claims: dict[str, Any]) -> Principal | str:
    subject, role, merchants = claims["sub"], claims["role"], claims["merchants"]
    if not isinstance(subject, str) or not subject:
        return "the token's sub is not a string"
    try:
        parsed_role = Role(role)
    except ValueError:
        return f"the token's role {role!r} is not one of {', '.join(r.value for r in Role)}"
    if (
        not isinstance(merchants, list)
        or not merchants
        or len(merchants) > TOKEN_MERCHANTS_MAX
        or not all(isinstance(m, str) and m for m in merchants)
    ):
        return f"the token's merchants is not a list of 1 to {TOKEN_MERCHANTS_MAX} ids"
    every = EVERY_MERCHANT in merchants
    return Principal(
        subject=subject,
        role=parsed_role,
        merchants=frozenset(() if every else merchants),
        every_merchant=every,
        expires_at=float(claims["exp"]) + LEEWAY_S,
    )


# ------------------------------------------------------------------ local keys and minting


class LocalKeys:
    """A directory holding a private signing key and the JWKS file that verifies it.

    signing-key.pem   the current Ed25519 private key (PKCS#8, mode 0600)
    keys.jwks         the public keys every process accepts (``--auth-keys``)
    """

    SIGNING_KEY = "signing-key.pem"
    JWKS = "keys.jwks"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def signing_key_path(self) -> Path:
        return self.directory / self.SIGNING_KEY

    @property
    def jwks_path(self) -> Path:
        return self.directory / self.JWKS

    def ensure(self) -> str:
        """Create the directory, a signing key and the JWKS file where missing; the kid of
        the signing key (its public key is in the JWKS file)."""
        if not self.signing_key_path.exists():
            return self.rotate()
        private = self.signing_key()
        kid = key_id(private)
        if kid not in self._jwks_entries_by_kid():
            self._write_jwks([*self._jwks_entries(), _public_jwk(private, kid)])
        return kid

    def rotate(self) -> str:
        """A new signing key; its public key joins the JWKS file and the old ones stay (so
        tokens already out keep working until ``retire``). Its kid."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        private = Ed25519PrivateKey.generate()
        kid = key_id(private)
        self._write_jwks([*self._jwks_entries(), _public_jwk(private, kid)])
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomically(self.signing_key_path, pem, mode=0o600)
        return kid

    def retire(self, kid: str) -> None:
        """Remove a public key: tokens it signed are refused from then on. The current
        signing key cannot be retired (rotate first)."""
        if self.signing_key_path.exists() and self.current_key_id() == kid:
            raise KeyringError(f"{kid} is the current signing key: rotate first")
        entries = self._jwks_entries()
        kept = [entry for entry in entries if entry.get("kid") != kid]
        if len(kept) == len(entries):
            raise KeyringError(f"{kid} is not in {self.jwks_path}")
        self._write_jwks(kept)

    def key_ids(self) -> list[str]:
        return list(self._jwks_entries_by_kid())

    def current_key_id(self) -> str:
        return key_id(self.signing_key())

    def signing_key(self) -> Ed25519PrivateKey:
        try:
            private = serialization.load_pem_private_key(
                self.signing_key_path.read_bytes(), password=None
            )
        except (OSError, ValueError) as error:
            raise KeyringError(f"{self.signing_key_path}: {error}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyringError(f"{self.signing_key_path}: not an Ed25519 private key")
        return private

    def mint(
        self,
        role: Role,
        merchants: Iterable[str],
        *,
        subject: str = "",
        ttl_s: float = 3600.0,
        now: float | None = None,
    ) -> str:
        return mint(self.signing_key(), role, merchants, subject=subject, ttl_s=ttl_s, now=now)

    def _jwks_entries(self) -> list[dict[str, Any]]:
        if not self.jwks_path.exists():
            return []
        try:
            document = json.loads(self.jwks_path.read_bytes())
            entries = document["keys"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise KeyringError(f"{self.jwks_path}: {error}") from None
        return [entry for entry in entries if isinstance(entry, dict)]

    def _jwks_entries_by_kid(self) -> dict[str, dict[str, Any]]:
        return {str(entry.get("kid")): entry for entry in self._jwks_entries()}

    def _write_jwks(self, entries: list[dict[str, Any]]) -> None:
        document = json.dumps({"keys": entries}, indent=2) + "\n"
        write_atomically(self.jwks_path, document.encode(), mode=0o644)


def mint(
    private: Ed25519PrivateKey,
    role: Role,
    merchants: Iterable[str],
    *,
    subject: str = "",
    ttl_s: float = 3600.0,
    now: float | None = None,
) -> str:
    """A token for ``role`` over ``merchants`` (``"*"``: every merchant), valid ``ttl_s``."""
    issued = time.time() if now is None else now
    claims = {
        "sub": subject or f"{role.value}-local",
        "role": role.value,
        "merchants": sorted(set(merchants)),
        "aud": AUDIENCE,
        "iat": int(issued),
        "exp": int(issued + ttl_s),
    }
    return jwt.encode(claims, private, algorithm="EdDSA", headers={"kid": key_id(private)})


def key_id(private: Ed25519PrivateKey) -> str:
    """A key's id: the first 16 characters of its public key's SHA-256 (base64url)."""
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).decode()[:16]


def _public_jwk(private: Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    return {**entry, "kid": kid, "alg": "EdDSA", "use": "sig"}


def write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Readers see the old file or the new one, never a part of it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(temporary, mode)
    os.replace(temporary, path)
