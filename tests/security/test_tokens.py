"""Tokens: what is accepted, what is refused, and keys rotated without a restart.

The verifier over a real JWKS file in a temporary directory, with real keys: every way a
token can be wrong is refused with a reason (never the token), a key added to the file is
accepted and a key removed from it refused, cached tokens included.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shard_router.common.access import Principal, Role
from shard_router.common.tokens import (
    LEEWAY_S,
    TOKEN_CHARS_MAX,
    VERIFIED_TOKENS_MAX,
    Keyring,
    KeyringError,
    LocalKeys,
    TokenRefused,
    Verifier,
    key_id,
    mint,
)


@pytest.fixture
def keys(tmp_path: Path) -> LocalKeys:
    local = LocalKeys(tmp_path / "auth")
    local.ensure()
    return local


def verifier_of(keys: LocalKeys) -> Verifier:
    return Verifier(Keyring(keys.jwks_path))


def bearer(token: str) -> str:
    return "Bearer " + token


def refusal(verifier: Verifier, header: str | None) -> str:
    with pytest.raises(TokenRefused) as refused:
        verifier.principal(header)
    return str(refused.value)


def test_a_good_token_gives_its_role_and_merchants(keys: LocalKeys) -> None:
    token = keys.mint(Role.GATEWAY, ["m-1", "m-2"], subject="pos-gw-7", ttl_s=600)
    principal = verifier_of(keys).principal(bearer(token))
    assert principal == Principal(
        subject="pos-gw-7",
        role=Role.GATEWAY,
        merchants=frozenset({"m-1", "m-2"}),
        every_merchant=False,
        expires_at=pytest.approx(time.time() + 600 + LEEWAY_S, abs=2),
    )
    every = verifier_of(keys).principal(bearer(keys.mint(Role.ADMIN, ["*"])))
    assert every.every_merchant and every.merchants == frozenset()


def test_an_expired_token_is_refused_even_once_cached(keys: LocalKeys) -> None:
    clock = [time.time()]
    verifier = Verifier(Keyring(keys.jwks_path), clock=lambda: clock[0])
    token = keys.mint(Role.PARTNER, ["m-1"], ttl_s=60)
    verifier.principal(bearer(token))  # cached now
    clock[0] += 60 + LEEWAY_S + 1
    assert "expired" in refusal(verifier, bearer(token))
    old = keys.mint(Role.PARTNER, ["m-1"], ttl_s=60, now=time.time() - 3600)
    assert "expired" in refusal(verifier_of(keys), bearer(old))


def test_a_token_signed_by_another_key_under_a_known_kid_is_refused(keys: LocalKeys) -> None:
    intruder = Ed25519PrivateKey.generate()
    claims = {"sub": "x", "role": "admin", "merchants": ["*"], "aud": "inventory",
              "exp": int(time.time()) + 600}  # fmt: skip
    kid = keys.key_ids()[0]
    forged = jwt.encode(claims, intruder, algorithm="EdDSA", headers={"kid": kid})
    assert "not valid" in refusal(verifier_of(keys), bearer(forged))


def test_unsigned_and_algorithm_swapped_tokens_are_refused(keys: LocalKeys) -> None:
    kid = keys.key_ids()[0]
    claims = {"sub": "x", "role": "admin", "merchants": ["*"], "aud": "inventory",
              "exp": int(time.time()) + 600}  # fmt: skip
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    assert "not valid" in refusal(verifier_of(keys), bearer(unsigned))
    # HS256 keyed with the public key's bytes: the classic confusion; the key verifies
    # EdDSA only.
    public = json.loads(keys.jwks_path.read_text())["keys"][0]["x"].encode()
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": kid}).encode()).rstrip(
        b"="
    )
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    import hashlib
    import hmac

    signature = base64.urlsafe_b64encode(
        hmac.new(public, header + b"." + body, hashlib.sha256).digest()
    ).rstrip(b"=")
    swapped = (header + b"." + body + b"." + signature).decode()
    assert "not valid" in refusal(verifier_of(keys), bearer(swapped))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"aud": "someone-else"}, "not valid"),
        ({"role": "superuser"}, "role"),
        ({"merchants": "m-1"}, "merchants"),
        ({"merchants": []}, "merchants"),
        ({"merchants": ["m-1", ""]}, "merchants"),
        ({"sub": ""}, "sub"),
        ({"nbf": int(time.time()) + 3600}, "not valid"),
    ],
)
def test_a_token_with_bad_claims_is_refused_with_the_reason(
    keys: LocalKeys, change: dict[str, object], reason: str
) -> None:
    claims = {"sub": "x", "role": "admin", "merchants": ["m-1"], "aud": "inventory",
              "exp": int(time.time()) + 600, **change}  # fmt: skip
    token = jwt.encode(claims, keys.signing_key(), algorithm="EdDSA",
                       headers={"kid": keys.key_ids()[0]})  # fmt: skip
    assert reason in refusal(verifier_of(keys), bearer(token))


@pytest.mark.parametrize("missing", ["exp", "sub", "role", "merchants", "aud"])
def test_a_token_missing_a_required_claim_is_refused(keys: LocalKeys, missing: str) -> None:
    claims = {"sub": "x", "role": "admin", "merchants": ["m-1"], "aud": "inventory",
              "exp": int(time.time()) + 600}  # fmt: skip
    del claims[missing]
    token = jwt.encode(claims, keys.signing_key(), algorithm="EdDSA",
                       headers={"kid": keys.key_ids()[0]})  # fmt: skip
    assert refusal(verifier_of(keys), bearer(token))


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer ",
        "Bearer a.b.c",
        "bearer x",
        "Token abc",
        "Bearer " + "a" * TOKEN_CHARS_MAX,
    ],
)
def test_malformed_authorization_metadata_is_refused(keys: LocalKeys, header: str | None) -> None:
    assert refusal(verifier_of(keys), header)


def test_a_token_without_kid_or_with_an_unknown_kid_is_refused(keys: LocalKeys) -> None:
    claims = {"sub": "x", "role": "admin", "merchants": ["*"], "aud": "inventory",
              "exp": int(time.time()) + 600}  # fmt: skip
    no_kid = jwt.encode(claims, keys.signing_key(), algorithm="EdDSA")
    assert "kid" in refusal(verifier_of(keys), bearer(no_kid))
    stranger = Ed25519PrivateKey.generate()
    unknown = mint(stranger, Role.ADMIN, ["*"])
    assert key_id(stranger) in refusal(verifier_of(keys), bearer(unknown))


def test_a_refusal_never_holds_the_token(keys: LocalKeys) -> None:
    stranger = Ed25519PrivateKey.generate()
    token = mint(stranger, Role.ADMIN, ["*"])
    reason = refusal(verifier_of(keys), bearer(token))
    assert token not in reason and token.split(".")[2] not in reason


def _age(path: Path) -> None:
    """Make the file's change visible to a refresh that compares mtimes."""
    stamp = time.time() + 5
    os.utime(path, (stamp, stamp))


def test_a_rotated_in_key_is_accepted_and_a_retired_one_refused_without_a_restart(
    keys: LocalKeys,
) -> None:
    keyring = Keyring(keys.jwks_path)
    verifier = Verifier(keyring)
    old_token = keys.mint(Role.ORDER_SERVICE, ["m-1"])
    verifier.principal(bearer(old_token))  # cached under the old key

    assert not keyring.refresh()  # just looked: the periodic look is a second away
    new_kid = keys.rotate()
    new_token = keys.mint(Role.ORDER_SERVICE, ["m-1"])
    # An unknown kid makes the keyring look at the file at once, whenever it last looked.
    assert verifier.principal(bearer(new_token)).role is Role.ORDER_SERVICE
    assert verifier.principal(bearer(old_token)).role is Role.ORDER_SERVICE  # both accepted

    retired = next(kid for kid in keys.key_ids() if kid != new_kid)
    keys.retire(retired)
    _age(keys.jwks_path)
    assert keyring.refresh(force=True)
    assert "not one of this service's keys" in refusal(verifier, bearer(old_token))
    assert verifier.principal(bearer(new_token)).role is Role.ORDER_SERVICE


def test_the_current_signing_key_cannot_be_retired(keys: LocalKeys) -> None:
    with pytest.raises(KeyringError, match="rotate first"):
        keys.retire(keys.current_key_id())


def test_a_keys_file_broken_by_an_edit_keeps_the_keys_it_had(keys: LocalKeys) -> None:
    keyring = Keyring(keys.jwks_path)
    verifier = Verifier(keyring)
    token = keys.mint(Role.ADMIN, ["*"])
    keys.jwks_path.write_text("{not json")
    _age(keys.jwks_path)
    assert not keyring.refresh(force=True)
    assert verifier.principal(bearer(token)).role is Role.ADMIN


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("[]", "not a JWKS"),
        ('{"keys": []}', "no key"),
        ('{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]}', "no kid"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}', "not accepted"),
    ],
)
def test_a_bad_keys_file_at_start_is_an_error_naming_the_problem(
    tmp_path: Path, document: str, problem: str
) -> None:
    path = tmp_path / "keys.jwks"
    path.write_text(document)
    with pytest.raises(KeyringError, match=problem):
        Keyring(path)


def test_the_cache_is_bounded_and_still_answers_right(
    keys: LocalKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shard_router.common import tokens

    monkeypatch.setattr(tokens, "VERIFIED_TOKENS_MAX", 8)
    verifier = verifier_of(keys)
    minted = [keys.mint(Role.PARTNER, [f"m-{i}"]) for i in range(20)]
    for token in minted:
        verifier.principal(bearer(token))
    assert len(verifier._answers) <= 8
    assert verifier.principal(bearer(minted[0])).merchants == {"m-0"}
    assert VERIFIED_TOKENS_MAX >= 1000  # the real bound


def test_a_cached_answer_costs_no_signature_check(keys: LocalKeys) -> None:
    verifier = verifier_of(keys)
    token = keys.mint(Role.PARTNER, ["m-1"])
    for _ in range(100):
        verifier.principal(bearer(token))
    assert verifier.checks == 1
    bad = bearer("x.y.z")
    for _ in range(100):
        with pytest.raises(TokenRefused):
            verifier.principal(bad)
    assert verifier.checks == 2  # refusals are remembered too


def test_local_keys_files_are_private_where_they_must_be(keys: LocalKeys) -> None:
    assert keys.signing_key_path.stat().st_mode & 0o777 == 0o600
    assert keys.directory.stat().st_mode & 0o077 == 0
    document = json.loads(keys.jwks_path.read_text())
    assert all("d" not in entry for entry in document["keys"])  # no private part published
