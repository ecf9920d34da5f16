"""The resume token codec: round trips, overrides, refusals, bounds."""

from __future__ import annotations

import base64
import zlib

from shard_router.router._watch_token import (
    RESUME_TOKEN_LENGTH_MAX,
    PositionsEncoder,
    ResumeToken,
    decode,
    encode,
    encode_positions,
    format_entry_id,
    parse_entry_id,
    positions_token,
    snapshot_token,
)

PARTITIONS = 1024


def test_positions_round_trip_and_zero_positions_are_left_out() -> None:
    positions = {p: (10_000 + p, p % 3) for p in range(PARTITIONS)}
    token = ResumeToken("abcdef012345", positions)
    assert decode(encode(token), PARTITIONS) == token
    assert decode(encode(ResumeToken("f", {1: (0, 0)})), PARTITIONS) == ResumeToken("f", {})


def test_every_partition_fits_well_under_the_bound() -> None:
    positions = {p: (2**63 - p, 2**20) for p in range(PARTITIONS)}
    assert len(encode(ResumeToken("abcdef012345", positions))) < RESUME_TOKEN_LENGTH_MAX // 2


def test_overrides_win_over_the_base_including_zero() -> None:
    base = encode_positions({1: (5, 0), 2: (7, 1)})
    overrides = encode_positions({2: (0, 0)}, include_zero=True)
    decoded = decode(positions_token("f", base, overrides), PARTITIONS)
    assert decoded == ResumeToken("f", {1: (5, 0), 2: (0, 0)})


def test_snapshot_token_carries_no_positions() -> None:
    assert decode(snapshot_token("f"), PARTITIONS) == ResumeToken("f", None)


def test_malformed_tokens_are_refused_as_values() -> None:
    valid_blob = encode_positions({1: (5, 0)})
    for bad in (
        "x",
        "f.P.!!!.",
        "f.Q..",
        "f.S.abc.",
        positions_token("f", encode_positions({PARTITIONS: (1, 0)})),
        positions_token("f", valid_blob[:-3]),
        "f.P." + "A" * (RESUME_TOKEN_LENGTH_MAX + 1) + ".",
    ):
        assert isinstance(decode(bad, PARTITIONS), str), bad


def test_entry_ids_compare_as_numbers() -> None:
    assert parse_entry_id("10-0") > parse_entry_id("9-5")
    assert format_entry_id(parse_entry_id("123-4")) == "123-4"


def test_tokens_of_the_default_zlib_settings_still_decode_and_ours_inflate_anywhere() -> None:
    """Blobs are deflated with a small window now: the tokens routers issued before decode,
    and a plain zlib.decompress reads ours (so an older router reads them too)."""
    body = ",".join(f"{p:x}:{p + 100:x}:0" for p in range(0, PARTITIONS, 3))
    before = base64.urlsafe_b64encode(zlib.compress(body.encode(), 6)).decode().rstrip("=")
    expected = {p: (p + 100, 0) for p in range(0, PARTITIONS, 3)}
    assert decode(positions_token("f", before), PARTITIONS) == ResumeToken("f", expected)
    ours = encode_positions(expected)
    assert zlib.decompress(base64.urlsafe_b64decode(ours + "=" * (-len(ours) % 4))) == (
        body.encode()
    )


def test_the_incremental_encoder_matches_a_fresh_encoding_as_positions_move() -> None:
    encoder = PositionsEncoder()
    positions = {p: (0, 0) if p % 5 == 0 else (p, 1) for p in range(PARTITIONS)}
    for step in range(4):
        for p in range(step, PARTITIONS, 97):
            positions[p] = (positions[p][0] + 1, step)
        positions[7] = (0, 0)  # back to nothing read: left out again
        assert encoder.encode(positions) == encode_positions(positions)


def test_small_blobs_served_from_the_cache_are_the_ones_encoded() -> None:
    first = encode_positions({3: (5, 0), 9: (0, 0)}, include_zero=True)
    again = encode_positions({9: (0, 0), 3: (5, 0)}, include_zero=True)
    without_zero = encode_positions({3: (5, 0), 9: (0, 0)})
    assert first == again != without_zero
    base = encode_positions({3: (1, 0), 9: (4, 0)})
    assert decode(positions_token("f", base, first), PARTITIONS) == ResumeToken(
        "f", {3: (5, 0), 9: (0, 0)}
    )
