"""Hostile inputs for tests/security/test_fuzz.py, as hypothesis strategies.

``messages(descriptor, ids)`` draws a message of any type from its protobuf descriptor, so
every request message is covered and a field added to the proto is fuzzed without editing
this file. Half the messages are plausible: every field set to a real id of ``ids``, a
fresh id, an ordinary number (a time near now for an ``int64 *_ms``) or a named enum value,
one member of each oneof, so that the fuzz reaches past validation into the owners. The
other half are hostile, any field left out or set, per field type, to:

    integers   the type's extremes and their neighbours, small ordinary values, anything
    strings    empty, huge, unicode, control characters, and (when ``ids`` knows the field's
               name) real ids and ids near them: one character more or less, padded to the
               length bounds, "*", case changed, a NUL appended
    bytes      anything short
    enums      every named value and unknown ones (proto3 enums are open)
    messages   nested to ``DEPTH_MAX``; an InventoryKey is often a real key of ``ids``
    repeated   ``REPEATED_MAX`` elements, or many copies of one near-valid element (past the
               request bounds, still far below the message size bound)
    maps       a few entries, with the metadata keys the router propagates
    oneofs     none or one member; proto3 ``optional`` set or not

``Ids`` holds the real ids that exist in the running service. ``tokens``, ``raw_requests``
and ``metadata`` draw the other inputs: authorization values (good, expired, foreign,
unsigned, tampered, and tokens signed with the service's own key but with claims of any
shape), bytes that may or may not parse, and headers huge, many, binary or odd.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from inventory_core import limits
from shard_router.common.server import MESSAGE_BYTES_MAX
from shard_router.common.tokens import AUDIENCE, key_id

# Message nesting drawn at most (the deepest request, a BatchRequest's ReceiveQuota item,
# nests five deep: BatchItem > ReceiveQuotaRequest > QuotaTransfer > InventoryKey).
DEPTH_MAX = 5
# Elements of a repeated field drawn one by one; the many-copies case goes past the bounds
# (reserve_lines_max 100, availability_keys_max 1000).
REPEATED_MAX = 4
MANY_COPIES = (101, 1001)
# An element copied that many times is at most this large (a near-valid key, a short id).
COPIED_BYTES_MAX = 256
# Huge strings: past every length bound; 100,000 characters of 4 bytes stay far below the
# 4 MiB message bound so that the call reaches the service (raw_requests goes past it).
HUGE_LENGTHS = (
    limits.identifier_length_max + 1,
    limits.idempotency_key_length_max + 1,
    4097,
    100_000,
)
HUGE_CHARACTERS = ("a", "é", "\x00", "\U0001f6d2", "\u202e")
# One message past the server's receive bound.
OVERSIZED_BYTES = MESSAGE_BYTES_MAX + 1

_INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Metadata keys a BatchItem's map may carry that the router forwards (common/calls.py).
PROPAGATED_KEYS = ("x-request-id", "traceparent", "tracestate", "authorization")


@dataclass(frozen=True)
class Ids:
    """Real ids by field name (``merchant_id``, ``sku_id``, ``reservation_id`` ...) and
    real keys (merchant, sku, location), which near-valid requests are made of."""

    by_field: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    keys: tuple[tuple[str, str, str], ...] = ()

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.by_field.items())), self.keys))


# ------------------------------------------------------------------ scalars


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = {low, low + 1, -1, 0, 1, 2, high - 1, high, 2**31 - 1, 2**31, 2**32 - 1, 2**53}
    edges |= {2**63 - 1, -(2**31), -(2**63) + 1}
    return st.one_of(
        st.integers(max(low, -5), min(high, 100)),
        st.sampled_from(sorted(value for value in edges if low <= value <= high)),
        st.integers(low, high),
    )


def _near(value: str) -> st.SearchStrategy[str]:
    """Strings one step from a real id."""
    return st.sampled_from(
        [
            value + "x",
            value[:-1],
            value.upper(),
            f" {value} ",
            value + "\x00",
            value.ljust(limits.identifier_length_max, "0"),
            value.ljust(limits.identifier_length_max + 1, "0"),
            value.ljust(limits.idempotency_key_length_max + 1, "0"),
            "*",
            value + "/../" + value,
        ]
    )


# What gRPC sends as a header value that is not ``-bin``.
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
HOSTILE_TEXT = st.one_of(
    st.just(""),
    st.text(max_size=24),
    st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Co"]), max_size=24),
    st.builds(
        lambda character, length: character * length,
        st.sampled_from(HUGE_CHARACTERS),
        st.sampled_from(HUGE_LENGTHS),
    ),
)


def strings(real: Sequence[str]) -> st.SearchStrategy[str]:
    if not real:
        return HOSTILE_TEXT
    return st.one_of(st.sampled_from(real), st.sampled_from(real).flatmap(_near), HOSTILE_TEXT)


# ------------------------------------------------------------------ messages


def messages(descriptor: Descriptor, ids: Ids) -> st.SearchStrategy[Message]:
    """A message of ``descriptor``'s type: hostile (see the module docstring), or plausible
    (its fields left out or set to real ids and ordinary values), so that the fuzz reaches
    past validation."""
    return st.one_of(_messages(descriptor, ids, 0, True), _messages(descriptor, ids, 0, False))


@functools.cache
def _messages(
    descriptor: Descriptor, ids: Ids, depth: int, plausible: bool
) -> st.SearchStrategy[Message]:
    cls = _message_class(descriptor)
    if depth > DEPTH_MAX:
        return st.just(cls())
    if descriptor.full_name == "inventory.v1.InventoryKey" and ids.keys:
        real = st.sampled_from(ids.keys).map(
            lambda k: cls(merchant_id=k[0], sku_id=k[1], location_id=k[2])
        )
        if plausible:
            return real
    in_oneof = {member.name for oneof in descriptor.oneofs for member in oneof.fields}
    fields = {
        item.name: _value(item, ids, depth, plausible)
        for item in descriptor.fields
        if item.name not in in_oneof
    }
    chosen = [_oneof(oneof, ids, depth, plausible) for oneof in descriptor.oneofs]
    # Hostile: any field may be left out (its default); plausible: every one is set.
    present = (
        st.fixed_dictionaries(fields) if plausible else st.fixed_dictionaries({}, optional=fields)
    )
    built = st.builds(_build, st.just(cls), present, st.tuples(*chosen))
    if descriptor.full_name == "inventory.v1.InventoryKey" and ids.keys:
        return st.one_of(real, built)
    return built


def _oneof(
    oneof: Any, ids: Ids, depth: int, plausible: bool
) -> st.SearchStrategy[tuple[str, Any] | None]:
    """None or one member of a oneof (one, when plausible); proto3 ``optional`` (a oneof of
    its own field, named after it) set or not."""
    members = [st.tuples(st.just(m.name), _value(m, ids, depth, plausible)) for m in oneof.fields]
    optional = len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name
    if plausible and not optional:
        return st.one_of(*members)
    return st.one_of(st.none(), *members)


def _message_class(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _build(
    cls: type[Message], values: dict[str, Any], chosen: tuple[tuple[str, Any] | None, ...]
) -> Message:
    message = cls()
    for name, value in [*values.items(), *(pair for pair in chosen if pair is not None)]:
        _assign(message, message.DESCRIPTOR.fields_by_name[name], value)
    return message


def _assign(message: Message, item: FieldDescriptor, value: Any) -> None:
    target = getattr(message, item.name)
    if _is_map(item):
        target.update(value)
    elif (item.is_repeated and item.type == FieldDescriptor.TYPE_MESSAGE) or item.is_repeated:
        target.extend(value)
    elif item.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, item.name, value)


def _is_map(item: FieldDescriptor) -> bool:
    return item.type == FieldDescriptor.TYPE_MESSAGE and item.message_type.GetOptions().map_entry


def _value(item: FieldDescriptor, ids: Ids, depth: int, plausible: bool) -> st.SearchStrategy[Any]:
    if _is_map(item):
        entry = item.message_type
        keys = st.one_of(st.sampled_from(PROPAGATED_KEYS), HOSTILE_TEXT)
        values = _scalar(entry.fields_by_name["value"], ids, depth, plausible)
        return st.dictionaries(keys, values, max_size=REPEATED_MAX)
    one = _scalar(item, ids, depth, plausible)
    if not item.is_repeated:
        return one
    if plausible:
        return st.lists(one, min_size=1, max_size=2)
    many = st.tuples(one, st.sampled_from(MANY_COPIES)).map(_copies)
    few = st.lists(one, max_size=REPEATED_MAX)
    return st.one_of(few, few, few, many)  # many copies one time in four


def _copies(pair: tuple[Any, int]) -> list[Any]:
    """Many copies of a small element (one of a large one: the message stays sendable)."""
    element, count = pair
    size = element.ByteSize() if isinstance(element, Message) else len(str(element))
    return [element] * (count if size <= COPIED_BYTES_MAX else 1)


def _scalar(item: FieldDescriptor, ids: Ids, depth: int, plausible: bool) -> st.SearchStrategy[Any]:
    kind = item.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _messages(item.message_type, ids, depth + 1, plausible)
    if plausible:
        return _ordinary(item, ids)
    if kind in _INTEGER_RANGES:
        return integers(*_INTEGER_RANGES[kind])
    if kind == FieldDescriptor.TYPE_ENUM:
        named = [value.number for value in item.enum_type.values]
        return st.one_of(st.sampled_from(named), integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.TYPE_STRING:
        return strings(ids.by_field.get(item.name, ()))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    raise AssertionError(f"{item.full_name}: a field type the fuzzer does not know ({kind})")


# A plausible id the service has not seen (a new idempotency key, event id ...).
FRESH_IDS = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=4, max_size=12
).map(lambda text: "fuzz-" + text)


def _ordinary(item: FieldDescriptor, ids: Ids) -> st.SearchStrategy[Any]:
    """A value a well-behaved caller would send in ``item``."""
    kind = item.type
    if kind == FieldDescriptor.TYPE_STRING:
        real = ids.by_field.get(item.name, ())
        return st.one_of(st.sampled_from(real), FRESH_IDS) if real else FRESH_IDS
    if kind == FieldDescriptor.TYPE_ENUM:
        named = [value.number for value in item.enum_type.values if value.number]
        return st.sampled_from(named or [0])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=8)
    if (
        item.name.endswith("_ms") and kind == FieldDescriptor.TYPE_INT64
    ):  # now, give or take an hour
        now = int(time.time() * 1000)
        return st.integers(now - 3_600_000, now + 3_600_000)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(0, 100)
    return st.sampled_from([1, 2, 3, 5, 60, 600, 5000, 0])


# ------------------------------------------------------------------ raw bytes


def raw_requests(valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Bytes for a method: anything, a valid request's bytes cut or flipped, wire-format
    traps (a varint that never ends, a length past the end, groups nested deep), and one
    message past the size bound."""
    serialized = valid.map(lambda message: message.SerializeToString())
    return st.one_of(
        st.binary(max_size=256),
        st.tuples(serialized, st.integers(0, 2**16)).map(
            lambda pair: pair[0][: pair[1] % (len(pair[0]) + 1)]
        ),
        st.tuples(serialized, st.integers(0, 2**16), st.integers(1, 255)).map(_flip),
        st.sampled_from(
            [
                b"\x08" + b"\xff" * 11,
                b"\x0a\xff\xff\xff\xff\x0f",
                b"\x0b" * 10_000,
                b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
                b"\x0f",
                b"\x0a\x02\xc3\x28",  # a string field that is not UTF-8
                b"\x00" * OVERSIZED_BYTES,
            ]
        ),
    )


def _flip(triple: tuple[bytes, int, int]) -> bytes:
    data, at, mask = triple
    if not data:
        return bytes([mask])
    position = at % len(data)
    return data[:position] + bytes([data[position] ^ mask]) + data[position + 1 :]


# ------------------------------------------------------------------ tokens and metadata


@dataclass(frozen=True)
class TokenKit:
    """What the token strategies sign with: the service's key and one it does not know."""

    signing_key: Ed25519PrivateKey
    # Good tokens scoped to some merchants, and good for every merchant.
    good: tuple[str, ...]
    every: tuple[str, ...]
    foreign_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | HOSTILE_TEXT,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _claims(kit: TokenKit) -> st.SearchStrategy[dict[str, Any]]:
    now = int(time.time())
    return st.fixed_dictionaries(
        {},
        optional={
            "sub": st.one_of(st.just("fuzz"), JSON_VALUES),
            "role": st.one_of(
                st.sampled_from(["admin", "partner", "router", "Admin", ""]), JSON_VALUES
            ),
            "merchants": st.one_of(
                st.lists(st.sampled_from(["*", "m-fuzz", "", "m-guard"]), max_size=3),
                st.builds(lambda n: [f"m-{i}" for i in range(n)], st.sampled_from([1000, 1001])),
                JSON_VALUES,
            ),
            "aud": st.one_of(st.just(AUDIENCE), JSON_VALUES),
            "exp": st.one_of(st.sampled_from([now + 600, now - 600, 2**63, 0]), JSON_VALUES),
            "nbf": st.one_of(st.just(now + 3600), JSON_VALUES),
        },
    )


def _signed(claims: dict[str, Any], private: Ed25519PrivateKey, kid: Any) -> str:
    return jwt.encode(claims, private, algorithm="EdDSA", headers={"kid": kid})


# What a token drawn by ``tokens`` must get: accepted (scoped to some merchants, or to every
# merchant), refused UNAUTHENTICATED, or either (claims of any shape signed with the
# service's own key may happen to be good, for any merchant).
GOOD, GOOD_EVERY, REFUSED, EITHER = "good", "good for every merchant", "refused", "either"
Token = tuple[str | None, str]


def tokens(kit: TokenKit) -> st.SearchStrategy[Token]:
    """An ``authorization`` value (None: the header absent) and what it must get."""
    own_kid = key_id(kit.signing_key)
    good = st.sampled_from(kit.good)
    bearer = "Bearer "
    refused = st.one_of(
        st.none(),
        st.builds(
            lambda c, kid: bearer + _signed(c, kit.foreign_key, kid),
            _claims(kit),
            st.one_of(st.just(own_kid), st.just(key_id(kit.foreign_key)), HOSTILE_TEXT),
        ),
        good.map(lambda token: bearer + _unsigned(token)),
        st.tuples(good, st.integers(0, 2**16), st.sampled_from([1, 2, 4, 32]))
        .map(lambda t: bearer + _printable(_flip((t[0].encode(), t[1], t[2]))))
        .filter(lambda value: value[len(bearer) :] not in kit.good),
        good.map(lambda token: bearer + token.rsplit(".", 1)[0]),
        good,  # without "Bearer "
        st.sampled_from(
            ["", "Bearer", "Bearer ", "bearer x", "Basic dXNlcjpwYXNz", "Bearer a.b.c"]
        ),
        st.text(PRINTABLE, max_size=64),
        st.sampled_from([4097, 8000]).map(lambda n: bearer + "a" * (n - len(bearer))),
        st.just(bearer + _expired(kit.signing_key, own_kid)),
    )
    drawn = {
        GOOD: good.map(lambda token: bearer + token),
        GOOD_EVERY: st.sampled_from(kit.every).map(lambda token: bearer + token),
        EITHER: _claims(kit).map(lambda c: bearer + _signed(c, kit.signing_key, own_kid)),
        REFUSED: refused,
    }
    # Most calls carry a good token, so that the requests reach the service.
    return st.sampled_from(
        [GOOD, GOOD, GOOD, GOOD_EVERY, GOOD_EVERY, GOOD_EVERY, EITHER, REFUSED]
    ).flatmap(lambda expectation: drawn[expectation].map(lambda value: (value, expectation)))


def _expired(private: Ed25519PrivateKey, kid: str) -> str:
    """A good admin token, expired past the clock skew allowed."""
    now = int(time.time())
    claims = {"sub": "fuzz", "role": "admin", "merchants": ["*"], "aud": AUDIENCE}
    return _signed({**claims, "iat": now - 7200, "exp": now - 3600}, private, kid)


def _printable(data: bytes) -> str:
    """``data`` as a header value gRPC sends (printable ASCII): others become "~"."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E else "~" for b in data)


def _unsigned(token: str) -> str:
    """The token with its header changed to ``alg: none`` and its signature dropped."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, None, algorithm="none") if _none_allowed() else token + "x"


@functools.cache
def _none_allowed() -> bool:
    try:
        jwt.encode({}, None, algorithm="none")
    except (NotImplementedError, jwt.InvalidKeyError, TypeError):
        return False
    return True


HEADER_KEYS = st.one_of(
    st.sampled_from(["x-request-id", "traceparent", "tracestate", "authorization", "x-fuzz"]),
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_."), min_size=1, max_size=16),
).filter(lambda key: not key.startswith("grpc-") and not key.endswith("-bin"))


def metadata(authorization: str | None) -> st.SearchStrategy[list[tuple[str, Any]]]:
    """Headers of a call: its authorization and others, up to the transport's limits and
    past them (16 KiB of headers is gRPC's hard limit): huge values, many headers, ``-bin``
    headers with bytes that are no UTF-8, and near-valid trace context."""
    value = st.one_of(
        st.text(PRINTABLE, max_size=40),
        st.sampled_from([1000, 8000, 16_385, 100_000]).map(lambda n: "v" * n),
        st.just("00-" + "0" * 32 + "-" + "0" * 16 + "-01"),
        st.just("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    )
    plain = st.tuples(HEADER_KEYS, value)
    binary = st.tuples(
        HEADER_KEYS.map(lambda key: key + "-bin"),
        st.binary(max_size=64) | st.just(b"\xff\xfe" * 5000),
    )
    many = st.builds(
        lambda n: [(f"x-many-{i}", "v" * 10) for i in range(n)], st.sampled_from([100, 500, 2000])
    )
    others = st.one_of(st.lists(st.one_of(plain, binary), max_size=4), many)
    return others.map(lambda rest: header(authorization) + rest)


def header(authorization: str | None) -> list[tuple[str, Any]]:
    """The metadata that carries ``authorization`` (none for None)."""
    return [] if authorization is None else [("authorization", authorization)]
