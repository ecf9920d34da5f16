"""``inventory token`` and ``inventory keys``: the local signing key and the tokens it signs.

``inventory up`` keeps a key directory in its data directory (``DATA_DIR/auth``; made on the
first run, kept across restarts):

    signing-key.pem   the Ed25519 private key that signs local tokens (mode 0600)
    keys.jwks         the public keys every process accepts (``--auth-keys``)
    router.token      the router's own token to the shards, minted at every start

    inventory token --role order_service --merchant m-1      a token, on stdout alone
    inventory keys list | rotate | retire KID                 the keys the processes accept

The processes read ``keys.jwks`` again within a second of a change, so ``rotate`` (a new
signing key; the old public key stays, and so do the tokens it signed) and ``retire`` (the
old public key goes: its tokens are refused) need no restart. A deployment uses its own
identity provider's keys instead: any JWKS file of EdDSA, ES256 or RS256 keys.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from .common.access import EVERY_MERCHANT, Role
from .common.config import env
from .common.tokens import KeyringError, LocalKeys

# The router's token to the shards, minted by `up` at every start.
ROUTER_TOKEN_FILE = "router.token"
ROUTER_TOKEN_TTL_S = 30 * 86_400
# A local token's lifetime unless --ttl-s says otherwise.
TOKEN_TTL_S_DEFAULT = 86_400
EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class LocalAuth:
    """What ``up`` hands its processes."""

    jwks_path: Path
    router_token_path: Path
    key_id: str


def prepare_local_auth(data_dir: Path) -> LocalAuth:
    """The key directory of ``data_dir`` (made where missing) and a fresh router token."""
    keys = LocalKeys(data_dir / "auth")
    kid = keys.ensure()
    token = keys.mint(Role.ROUTER, [EVERY_MERCHANT], subject="router", ttl_s=ROUTER_TOKEN_TTL_S)
    path = keys.directory / ROUTER_TOKEN_FILE
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(token + "\n")
    return LocalAuth(keys.jwks_path, path, kid)


def token_hint() -> str:
    """How to get a token, for ``up``'s terminal."""
    return (
        "callers need a token: inventory token --role order_service --merchant m-1 "
        f"(roles: {', '.join(role.value for role in Role if role is not Role.ROUTER)}; "
        "--merchant '*' for every merchant)"
    )


def add_subcommands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    token = add("token", "print a signed token for a caller of the local run (inventory up)")
    token.add_argument(
        "--role",
        required=True,
        choices=[role.value for role in Role],
        help="what the caller may do: order_service (reserve, commit, release, extend, "
        "reads), gateway (feeds, adjust, set, deliveries, reads), partner (reads, Watch), "
        "admin (everything), router (the router's own hop to the shards)",
    )
    token.add_argument(
        "--merchant",
        action="append",
        required=True,
        metavar="MERCHANT_ID",
        help="a merchant the caller may act for; repeat for more, '*' for every merchant",
    )
    token.add_argument(
        "--ttl-s", type=float, default=TOKEN_TTL_S_DEFAULT, help="how long the token is good"
    )
    token.add_argument("--subject", default="", help="who calls (default: ROLE-local)")
    _add_data_dir(token)
    token.set_defaults(run=_token)

    keys = add("keys", "list, rotate or retire the keys that verify tokens of the local run")
    keys.add_argument("action", choices=["list", "rotate", "retire"])
    keys.add_argument("kid", nargs="?", default="", help="the key to retire")
    _add_data_dir(keys)
    keys.set_defaults(run=_keys)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=env("DATA_DIR", ".inventory"),
        help="the data directory of inventory up, whose auth/ holds the keys [INVENTORY_DATA_DIR]",
    )


def _token(options: argparse.Namespace) -> None:
    keys = LocalKeys(Path(options.data_dir) / "auth")
    if not keys.signing_key_path.exists():
        _fail(f"no signing key in {keys.directory}: run inventory up once (it makes one)")
    if options.ttl_s <= 0:
        _fail("--ttl-s must be positive")
    try:
        token = keys.mint(
            Role(options.role), options.merchant, subject=options.subject, ttl_s=options.ttl_s
        )
    except KeyringError as error:
        _fail(str(error))
    print(token, flush=True)


def _keys(options: argparse.Namespace) -> None:
    keys = LocalKeys(Path(options.data_dir) / "auth")
    try:
        if options.action == "rotate":
            print(
                f"signing with {keys.rotate()}; tokens of the older keys stay good until "
                "those are retired",
                flush=True,
            )
        elif options.action == "retire":
            if not options.kid:
                _fail("retire needs the KID (inventory keys list shows them)")
            keys.retire(options.kid)
            print(
                f"retired {options.kid}: tokens it signed are refused within a second", flush=True
            )
        current = keys.signing_key_path.exists() and keys.current_key_id()
        for kid in keys.key_ids():
            print(f"{kid}{'  (signing)' if kid == current else ''}", flush=True)
    except KeyringError as error:
        _fail(str(error))


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)
