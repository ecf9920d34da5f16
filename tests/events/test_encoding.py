"""Commands encoded once: a change's script arguments, the frames, and sending them raw.

The frames bypass redis-py's encoder, so these tests read them back as RESP and check every
argument the apply script is given, and that a server error answers in its place without
putting the connection out of step.
"""

from __future__ import annotations

import redis.asyncio as redis
from inventory.v1 import events_pb2
from redis.exceptions import ResponseError

from inventory_core import InventoryKey, StockRow, partition_of
from persistence.readview import (
    EventReader,
    apply_command,
    encode_change,
    index_key,
    level_key,
    send_commands,
    stamp_command,
    stream_key,
)

from ._support import T0_MS, change, run


def bulk_strings(parts: bytes) -> list[bytes]:
    """A run of RESP bulk strings back into their values."""
    values = []
    rest = parts
    while rest:
        length_line, _, rest = rest.partition(b"\r\n")
        assert length_line.startswith(b"$"), length_line
        length = int(length_line[1:])
        values.append(rest[:length])
        assert rest[length : length + 2] == b"\r\n"
        rest = rest[length + 2 :]
    return values


def parse_command(frame: bytes) -> list[bytes]:
    """A RESP command frame (an array of bulk strings) back into its arguments."""
    head, _, rest = frame.partition(b"\r\n")
    assert head.startswith(b"*")
    arguments = bulk_strings(rest)
    assert len(arguments) == int(head[1:]), "the header counts every argument"
    return arguments


def test_a_change_is_encoded_with_every_argument_the_script_takes() -> None:
    key = InventoryKey("m-1", "sku|odd", "loc-1")  # a '|' in an id stays inside its member
    event = change(key, 7, 42, on_hand=10, reserved=3, safety_stock=2, before=StockRow(9, 3, 2, 6))
    encoded = encode_change(event, 2, T0_MS + 9)
    assert (encoded.lsn, encoded.index, encoded.committed_at_ms) == (42, 2, T0_MS + 9)
    partition = partition_of("m-1", "loc-1")
    assert bulk_strings(encoded.keys) == [
        stream_key(partition).encode(),
        level_key("m-1", "loc-1", "sku|odd").encode(),
        index_key("m-1").encode(),
    ]
    arguments = bulk_strings(encoded.arguments)
    payload = events_pb2.AvailabilityChanged.FromString(arguments[2])
    assert (payload.version, payload.lsn, payload.committed_at_ms) == (7, 42, T0_MS + 9)
    assert (payload.before.on_hand, payload.after.available) == (9, 5)
    assert arguments[:2] + arguments[3:] == [
        b"42",
        b"2",
        b"7",
        b"10",
        b"3",
        b"2",
        b"5",
        str(partition).encode(),
        str(T0_MS + 9).encode(),
        b"loc-1|sku|odd",
        b"0",  # stale_buffer, stale_since_ms: a live location
        b"0",
        b"0",  # incoming, incoming_eta_ms: no delivery expected
        b"0",
        b"0",  # allotted: not a hot key's home
    ]


def test_one_script_call_carries_a_batch_keys_first_then_the_cap_then_arguments() -> None:
    keys = [InventoryKey("m-1", f"sku-{i}", "loc-1") for i in range(3)]
    encoded = [encode_change(change(k, 1, 5), i, T0_MS) for i, k in enumerate(keys)]
    arguments = parse_command(apply_command(encoded, 1234))
    assert arguments[0] == b"EVAL" and arguments[2] == b"9"  # 3 keys per change
    assert arguments[3:12] == [part for e in encoded for part in bulk_strings(e.keys)]
    assert arguments[12] == b"1234"
    assert arguments[13:] == [part for e in encoded for part in bulk_strings(e.arguments)]
    assert len(arguments) == 4 + 19 * len(encoded)


def test_an_error_answer_comes_back_in_its_place_and_the_connection_stays_in_step(
    fresh_redis_url: str,
) -> None:
    async def main() -> None:
        client = redis.Redis.from_url(fresh_redis_url, protocol=2)
        try:
            ping = b"*1\r\n$4\r\nPING\r\n"
            bogus = b"*1\r\n$12\r\nNO-SUCH-VERB\r\n"
            count = b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n"
            answers = await send_commands(client, [ping, bogus, count, ping])
            assert answers[0] == b"PONG" and answers[3] == b"PONG"
            assert isinstance(answers[1], ResponseError)
            assert answers[2] == 1
            assert await send_commands(client, [ping]) == [b"PONG"]
            assert await client.ping()  # redis-py's own calls share the pool
        finally:
            await client.aclose()

    run(main)


def test_freshness_stamps_are_one_mset_read_back_per_partition(fresh_redis_url: str) -> None:
    async def main() -> None:
        stamps = {3: T0_MS, 700: T0_MS + 1}
        assert parse_command(stamp_command(stamps))[0] == b"MSET"
        client = redis.Redis.from_url(fresh_redis_url, protocol=2)
        reader = EventReader(fresh_redis_url)
        try:
            assert await send_commands(client, [stamp_command(stamps)]) == [b"OK"]
            assert await reader.asof([700, 3, 9]) == {3: T0_MS, 9: None, 700: T0_MS + 1}
        finally:
            await client.aclose()
            await reader.close()

    run(main)
