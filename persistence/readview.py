"""The Redis side of real-time availability (DESIGN section 8): layout, apply script, reader.

Layout (fixed: the publisher writes it, routers read it)::

    inv:events:{partition:04d}   stream per partition; entry id "{lsn}-{index}" (index = the
                                 change's position in its ledger record, from 0); one field
                                 "e" = AvailabilityChanged protobuf bytes; MAXLEN ~ capped
    inv:level:{merchant_id}|{location_id}|{sku_id}
                                 hash: on_hand, reserved, safety_stock, available, version,
                                 partition, lsn, committed_at_ms, stale_buffer,
                                 stale_since_ms, incoming, incoming_eta_ms (the read view)
    inv:keys:{merchant_id}       set of "{location_id}|{sku_id}" (the read view's index)

One Lua script (``APPLY_SCRIPT``) applies a batch of changes atomically. Per change it
  1. appends the stream entry only if its id is greater than the stream's last id, so a
     republished duplicate is refused (ids increase with lsn; the script never errors on it);
  2. writes the level hash only if the change's version is greater than the stored one, so
     duplicated or out-of-order delivery converges to the latest version;
  3. adds the key to its merchant's index when the hash was written.
A publisher must append each partition's changes in lsn order (a late lower id is refused).

``EventReader`` is the router's view: snapshots of the read view, the streams' first and last
ids (to judge a resume position), XREAD after positions, and XRANGE for replays.

Commands on the hot paths (the publisher's script calls and freshness stamps, the hub's XREAD
and the stream ids) are RESP frames assembled from parts encoded once, and sent on a pooled
connection of the redis-py client (``send_commands``): redis-py encodes each argument of each
call in Python, about a microsecond apiece, which made an XREAD over 1024 streams cost ~2 ms
of CPU. A change is encoded when it is published (``encode_change``), a stream key once per
process, an entry id once per position.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from inventory.v1 import events_pb2, inventory_pb2
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

from inventory_core import PARTITION_COUNT, AvailabilityChanged, InventoryKey, StockRow

__all__ = [
    "APPLY_SCRIPT",
    "EMPTY_STREAM_ID",
    "STREAM_FIELD",
    "ApplyResult",
    "EncodedChange",
    "EventReader",
    "ReaderLimits",
    "SnapshotTooLarge",
    "apply_changes",
    "apply_command",
    "bulk",
    "change_payload",
    "change_to_proto",
    "encode_change",
    "index_key",
    "level_key",
    "parse_stream_id",
    "send_commands",
    "stamp_command",
    "stored_change",
    "stream_id",
    "stream_key",
]

STREAM_FIELD = b"e"
# What last_ids / first_ids report for an empty (or missing) stream: before every entry.
EMPTY_STREAM_ID = "0-0"


def stream_key(partition: int) -> str:
    return f"inv:events:{partition:04d}"


def level_key(merchant_id: str, location_id: str, sku_id: str) -> str:
    return f"inv:level:{merchant_id}|{location_id}|{sku_id}"


def index_key(merchant_id: str) -> str:
    return f"inv:keys:{merchant_id}"


# The newest (or oldest) entry id of each stream in KEYS, "0-0" for an empty stream.
LAST_IDS_SCRIPT = """
local ids = {}
for i, key in ipairs(KEYS) do
  local entry = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  ids[i] = entry and entry[1] or '0-0'
end
return ids
"""
FIRST_IDS_SCRIPT = """
local ids = {}
for i, key in ipairs(KEYS) do
  local entry = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
  ids[i] = entry and entry[1] or '0-0'
end
return ids
"""


def asof_key(partition: int) -> str:
    """Unix ms T such that every change of the partition committed before T is in Redis."""
    return f"inv:asof:{partition:04d}"


def stream_id(lsn: int, index: int) -> str:
    return f"{lsn}-{index}"


def parse_stream_id(entry_id: str) -> tuple[int, int]:
    lsn, _, index = entry_id.partition("-")
    return int(lsn), int(index)


# KEYS: per change, stream key, level key, index key.
# ARGV[1] = the stream's approximate length cap; then per change:
#   lsn, index, payload, version, on_hand, reserved, safety_stock, available, partition,
#   committed_at_ms, index member, stale_buffer, stale_since_ms, incoming, incoming_eta_ms,
#   allotted.
# Returns {appended, duplicates (stream entries refused), levels written}.
# Numbers are Lua doubles: exact up to 2^53, far beyond any lsn or version.
APPLY_SCRIPT = """
local cap = ARGV[1]
local last = {}
local appended, duplicates, written = 0, 0, 0
for i = 0, #KEYS / 3 - 1 do
  local stream, level, index = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local a = 1 + 16 * i
  local lsn, position = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local top = last[stream]
  if top == nil then
    top = {0, 0}
    local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if #newest > 0 then
      local l, p = string.match(newest[1][1], '^(%d+)-(%d+)$')
      top = {tonumber(l), tonumber(p)}
    end
  end
  if lsn > top[1] or (lsn == top[1] and position > top[2]) then
    redis.call('XADD', stream, 'MAXLEN', '~', cap, ARGV[a + 1] .. '-' .. ARGV[a + 2],
               'e', ARGV[a + 3])
    top = {lsn, position}
    appended = appended + 1
  else
    duplicates = duplicates + 1
  end
  last[stream] = top
  local stored = tonumber(redis.call('HGET', level, 'version') or '0')
  if tonumber(ARGV[a + 4]) > stored then
    redis.call('HSET', level, 'on_hand', ARGV[a + 5], 'reserved', ARGV[a + 6],
               'safety_stock', ARGV[a + 7], 'available', ARGV[a + 8],
               'version', ARGV[a + 4], 'partition', ARGV[a + 9], 'lsn', ARGV[a + 1],
               'committed_at_ms', ARGV[a + 10], 'stale_buffer', ARGV[a + 12],
               'stale_since_ms', ARGV[a + 13], 'incoming', ARGV[a + 14],
               'incoming_eta_ms', ARGV[a + 15], 'allotted', ARGV[a + 16])
    redis.call('SADD', index, ARGV[a + 11])
    written = written + 1
  end
end
return {appended, duplicates, written}
"""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    appended: int
    duplicates: int
    levels_written: int


def change_to_proto(
    event: AvailabilityChanged, committed_at_ms: int
) -> events_pb2.AvailabilityChanged:
    key = event.key
    return events_pb2.AvailabilityChanged(
        key=inventory_pb2.InventoryKey(
            merchant_id=key.merchant_id, sku_id=key.sku_id, location_id=key.location_id
        ),
        version=event.version,
        before=_counts(event.before),
        after=_counts(event.after),
        reason=event.reason.value,
        partition=event.partition,
        lsn=event.lsn,
        recorded_at_ms=event.recorded_at_ms,
        committed_at_ms=committed_at_ms,
    )


def _counts(row: StockRow) -> events_pb2.StockCounts:
    available = row.available
    if not (row.stale_since_ms or row.incoming or row.allotted):  # the common case
        return events_pb2.StockCounts(
            on_hand=row.on_hand,
            reserved=row.reserved,
            safety_stock=row.safety_stock,
            available=available,
            sellable=max(available, 0),
        )
    return events_pb2.StockCounts(
        on_hand=row.on_hand,
        reserved=row.reserved,
        safety_stock=row.safety_stock,
        available=available,
        stale_buffer=row.stale_buffer,
        stale_since_ms=row.stale_since_ms,
        sellable=max(row.offered, 0),
        incoming=row.incoming,
        incoming_eta_ms=row.incoming_eta_ms,
        allotted=row.allotted,
    )


# ------------------------------------------------------------------- commands encoded once


def bulk(value: bytes) -> bytes:
    """One RESP bulk string (a command's argument as it goes on the wire)."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


_ZERO = b"$1\r\n0\r\n"


def _number(value: int) -> bytes:
    if not value:
        return _ZERO  # most of a change's counts (stale buffer, incoming, ...) are 0
    digits = b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(digits), digits)


def _command(arguments: int, parts: bytes) -> bytes:
    """A command frame of ``arguments`` bulk strings, already joined in ``parts``."""
    return b"*%d\r\n%b" % (arguments, parts)


_EVAL = bulk(b"EVAL")
_MSET = bulk(b"MSET")
_APPLY_SCRIPT = bulk(APPLY_SCRIPT.encode())
_LAST_IDS_SCRIPT = bulk(LAST_IDS_SCRIPT.encode())
_FIRST_IDS_SCRIPT = bulk(FIRST_IDS_SCRIPT.encode())
# Keys the apply script takes per change, and arguments (see APPLY_SCRIPT).
_APPLY_KEYS_PER_CHANGE = 3
_APPLY_ARGUMENTS_PER_CHANGE = 16


@functools.cache
def _stream_key_bulk(partition: int) -> bytes:
    return bulk(stream_key(partition).encode())


@functools.cache
def _asof_key_bulk(partition: int) -> bytes:
    return bulk(asof_key(partition).encode())


# Merchants whose index key stays encoded: a shard's active merchants, with room to spare.
INDEX_KEY_BULKS_CACHED_MAX = 4096


@functools.lru_cache(maxsize=INDEX_KEY_BULKS_CACHED_MAX)
def _index_key_bulk(merchant_id: str) -> bytes:
    return bulk(index_key(merchant_id).encode())


@dataclass(frozen=True, slots=True)
class EncodedChange:
    """One change as the apply script takes it: its keys and arguments, encoded once."""

    partition: int
    lsn: int
    index: int  # the change's position in its ledger record
    committed_at_ms: int
    keys: bytes  # the script's three keys for it, as bulk strings
    arguments: bytes  # its fifteen arguments (the payload among them), as bulk strings


def change_payload(event: AvailabilityChanged, committed_at_ms: int) -> bytes:
    """A change as the stream entry and the ledger's outbox carry it (protobuf)."""
    return change_to_proto(event, committed_at_ms).SerializeToString()


def encode_change(
    event: AvailabilityChanged, index: int, committed_at_ms: int, payload: bytes | None = None
) -> EncodedChange:
    """The script's keys and arguments for one change, around its protobuf ``payload``
    (``change_payload``, when the caller has not encoded it already)."""
    if payload is None:
        payload = change_payload(event, committed_at_ms)
    key, after = event.key, event.after
    return _encoded(
        event.partition,
        event.lsn,
        index,
        committed_at_ms,
        payload,
        key=(key.merchant_id, key.location_id, key.sku_id),
        counts=(after.version, after.on_hand, after.reserved, after.safety_stock, after.available),
        extra=(
            after.stale_buffer,
            after.stale_since_ms,
            after.incoming,
            after.incoming_eta_ms,
            after.allotted,
        ),
    )


def stored_change(payload: bytes, index: int) -> EncodedChange:
    """A change as the ledger kept it (its payload), ready to be sent again byte for byte."""
    change = events_pb2.AvailabilityChanged.FromString(payload)
    key, after = change.key, change.after
    return _encoded(
        change.partition,
        change.lsn,
        index,
        change.committed_at_ms,
        payload,
        key=(key.merchant_id, key.location_id, key.sku_id),
        counts=(change.version, after.on_hand, after.reserved, after.safety_stock, after.available),
        extra=(
            after.stale_buffer,
            after.stale_since_ms,
            after.incoming,
            after.incoming_eta_ms,
            after.allotted,
        ),
    )


def _encoded(
    partition: int,
    lsn: int,
    index: int,
    committed_at_ms: int,
    payload: bytes,
    *,
    key: tuple[str, str, str],
    counts: tuple[int, int, int, int, int],
    extra: tuple[int, int, int, int, int],
) -> EncodedChange:
    """``extra``: stale_buffer, stale_since_ms, incoming, incoming_eta_ms, allotted."""
    merchant_id, location_id, sku_id = key
    version, on_hand, reserved, safety_stock, available = counts
    keys = b"".join(
        (
            _stream_key_bulk(partition),
            bulk(level_key(merchant_id, location_id, sku_id).encode()),
            _index_key_bulk(merchant_id),
        )
    )
    arguments = b"".join(
        (
            _number(lsn),
            _number(index),
            bulk(payload),
            _number(version),
            _number(on_hand),
            _number(reserved),
            _number(safety_stock),
            _number(available),
            _number(partition),
            _number(committed_at_ms),
            bulk(f"{location_id}|{sku_id}".encode()),
            *(_number(n) for n in extra),
        )
    )
    return EncodedChange(partition, lsn, index, committed_at_ms, keys, arguments)


def apply_command(changes: Sequence[EncodedChange], cap: int) -> bytes:
    """One call of the apply script over ``changes``, in order (``cap``: MAXLEN ~)."""
    count = len(changes)
    parts = [_EVAL, _APPLY_SCRIPT, _number(_APPLY_KEYS_PER_CHANGE * count)]
    parts.extend(change.keys for change in changes)
    parts.append(_number(cap))
    parts.extend(change.arguments for change in changes)
    arguments = 4 + (_APPLY_KEYS_PER_CHANGE + _APPLY_ARGUMENTS_PER_CHANGE) * count
    return _command(arguments, b"".join(parts))


def stamp_command(stamps: Mapping[int, int]) -> bytes:
    """One MSET of the freshness stamps (``asof_key``) of the given partitions."""
    parts = [_MSET]
    for partition, stamp in stamps.items():
        parts.append(_asof_key_bulk(partition))
        parts.append(_number(stamp))
    return _command(1 + 2 * len(stamps), b"".join(parts))


async def send_commands(client: redis.Redis, commands: Sequence[bytes]) -> list[Any]:
    """Write encoded commands in one go on one of ``client``'s connections; their answers.

    An error answer comes back as a ``ResponseError`` in its place (the rest are still read,
    so the connection stays in step). A socket error, a timeout or a cancellation raises, and
    redis-py drops that connection, as it does for its own calls.
    """
    pool = client.connection_pool
    connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await connection.send_packed_command(list(commands))
        answers: list[Any] = []
        for _ in commands:
            try:
                answers.append(await connection.read_response())
            except ResponseError as error:
                answers.append(error)
        return answers
    finally:
        await asyncio.shield(pool.release(connection))


async def apply_changes(
    client: redis.Redis, cap: int, changes: Sequence[EncodedChange]
) -> ApplyResult:
    """Run one apply script call over ``changes`` (tests and tools; the publisher pipelines)."""
    (answer,) = await send_commands(client, [apply_command(changes, cap)])
    if isinstance(answer, Exception):
        raise answer
    appended, duplicates, written = (int(value) for value in answer)
    return ApplyResult(appended, duplicates, written)


# -------------------------------------------------------------------------------- reader


@dataclass(frozen=True, slots=True)
class ReaderLimits:
    # Keys one snapshot may return: a merchant's whole catalogue at one dark store is ~50k
    # keys; 100k bounds a snapshot to ~10 MiB in memory and a few hundred ms of Redis time.
    snapshot_keys_max: int = 100_000
    # HGETALLs per pipeline round trip: large enough to amortise the trip, small enough not
    # to hold Redis for more than a millisecond or two.
    snapshot_pipeline_keys_max: int = 1_000
    # XREAD BLOCK longer than this is clamped: the socket waits at most this plus the command
    # timeout, so a dead server is noticed.
    read_block_ms_max: int = 30_000
    # Entries one read() or range() call may ask for, across all streams.
    read_count_max: int = 10_000
    # Every non-blocking command: Redis answers local commands in well under a millisecond.
    command_timeout_s: float = 5.0


class SnapshotTooLarge(Exception):
    """The filter matches more keys than ``snapshot_keys_max``: narrow it."""

    def __init__(self, matching: int, limit: int) -> None:
        super().__init__(f"{matching} keys match, at most {limit} per snapshot")
        self.matching = matching
        self.limit = limit


StreamChange = tuple[int, str, events_pb2.AvailabilityChanged]


class EventReader:
    """Reads the read view and the change streams (router side). Call ``close`` when done."""

    def __init__(
        self,
        redis_url: str,
        limits: ReaderLimits | None = None,
        partition_count: int = PARTITION_COUNT,
    ) -> None:
        self.limits = limits or ReaderLimits()
        self.partition_count = partition_count
        self._redis = _client(redis_url, self.limits.command_timeout_s)
        blocking_timeout_s = self.limits.read_block_ms_max / 1000 + self.limits.command_timeout_s
        self._blocking = _client(redis_url, blocking_timeout_s)
        self._streams = _StreamKeys(partition_count)
        self._read_command = _ReadCommand(self._streams)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._blocking.aclose()

    async def snapshot(
        self, merchant_id: str, location_ids: Iterable[str] = (), sku_ids: Iterable[str] = ()
    ) -> list[tuple[inventory_pb2.StockLevel, int, int]]:
        """The read view's levels of a merchant's matching keys: (level, partition, lsn).

        Empty filters match everything. Sorted by (location_id, sku_id). Raises
        ``SnapshotTooLarge`` beyond ``snapshot_keys_max`` keys.
        """
        locations, skus = set(location_ids), set(sku_ids)
        members: Any = await self._redis.smembers(index_key(merchant_id))
        matching: list[tuple[str, str]] = []
        for member in members:
            location_id, _, sku_id = _text(member).partition("|")
            if (not locations or location_id in locations) and (not skus or sku_id in skus):
                matching.append((location_id, sku_id))
        if len(matching) > self.limits.snapshot_keys_max:
            raise SnapshotTooLarge(len(matching), self.limits.snapshot_keys_max)
        matching.sort()
        levels = []
        step = self.limits.snapshot_pipeline_keys_max
        for start in range(0, len(matching), step):
            chunk = matching[start : start + step]
            async with self._redis.pipeline(transaction=False) as pipe:
                for location_id, sku_id in chunk:
                    pipe.hgetall(level_key(merchant_id, location_id, sku_id))
                hashes = await pipe.execute()
            for (location_id, sku_id), fields in zip(chunk, hashes, strict=True):
                if fields:  # indexed but gone (flushed by hand): skip rather than invent zeros
                    key = InventoryKey(merchant_id, sku_id, location_id)
                    levels.append(_level(key, fields))
        return levels

    async def levels(
        self, keys: Sequence[InventoryKey]
    ) -> list[tuple[inventory_pb2.StockLevel, int, int, int] | None]:
        """Read-view levels of given keys, in order: (level, partition, lsn, committed_at_ms),
        or None for a key the read view has never seen. For EVENTUAL reads."""
        if len(keys) > self.limits.snapshot_keys_max:
            raise SnapshotTooLarge(len(keys), self.limits.snapshot_keys_max)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(level_key(key.merchant_id, key.location_id, key.sku_id))
            hashes = await pipe.execute()
        found: list[tuple[inventory_pb2.StockLevel, int, int, int] | None] = []
        for key, fields in zip(keys, hashes, strict=True):
            if not fields:
                found.append(None)
                continue
            level, partition, lsn = _level(key, fields)
            found.append((level, partition, lsn, int(fields[b"committed_at_ms"])))
        return found

    async def asof(self, partitions: Sequence[int]) -> dict[int, int | None]:
        """Freshness stamps (see ``asof_key``); None where no publisher has stamped yet."""
        wanted = sorted(set(partitions))
        values = await self._redis.mget([asof_key(p) for p in wanted]) if wanted else []
        return {p: None if v is None else int(v) for p, v in zip(wanted, values, strict=True)}

    async def last_ids(self, partitions: Sequence[int] | None = None) -> dict[int, str]:
        """The newest entry id of each partition's stream ("0-0" when empty); all by default.

        One script call for all of them: a pipeline of 1024 commands cost the router about
        15 ms of CPU per call in redis-py.
        """
        return await self._ids(_LAST_IDS_SCRIPT, partitions)

    async def first_ids(self, partitions: Sequence[int] | None = None) -> dict[int, str]:
        """The oldest retained entry id of each partition's stream ("0-0" when empty).

        A resume position lower than its partition's first id may have missed trimmed
        entries: treat it as too old (fresh snapshot). Compare ids as (lsn, index) pairs
        (``parse_stream_id``), not as strings.
        """
        return await self._ids(_FIRST_IDS_SCRIPT, partitions)

    async def _ids(self, script: bytes, partitions: Sequence[int] | None) -> dict[int, str]:
        wanted = range(self.partition_count) if partitions is None else partitions
        if not wanted:
            return {}
        keys = self._streams.joined(tuple(wanted))
        command = _command(
            3 + len(wanted), b"%b%b%b%b" % (_EVAL, script, _number(len(wanted)), keys)
        )
        (answer,) = await send_commands(self._redis, [command])
        if isinstance(answer, Exception):
            raise answer
        return {p: _text(entry_id) for p, entry_id in zip(wanted, answer, strict=True)}

    async def read(
        self, positions: Mapping[int, str], block_ms: int, count: int
    ) -> list[StreamChange]:
        """XREAD the given partitions' streams after the given ids.

        Waits up to ``block_ms`` (clamped to ``read_block_ms_max``; 0 or less does not
        wait, unlike Redis where 0 waits forever) when nothing is there. ``count`` is per
        stream, as in XREAD. Changes come back per partition in id order. The command is
        built before the first await: ``positions`` may change once the call is under way.
        """
        if not positions:
            return []
        count = max(1, min(count, self.limits.read_count_max))
        block = min(block_ms, self.limits.read_block_ms_max)
        command = self._read_command.build(positions, count, block if block > 0 else None)
        (answer,) = await send_commands(self._blocking, [command])
        if isinstance(answer, Exception):
            raise answer
        changes: list[StreamChange] = []
        for name, entries in answer or ():  # RESP2: a list of [stream, entries], or nil
            changes.extend(_stream_changes(self._streams.partition_of[name], entries))
        return changes

    async def range(
        self, partition: int, after_id: str, up_to_id: str = "+", count: int = 1_000
    ) -> list[StreamChange]:
        """Entries of one partition's stream with after_id < id <= up_to_id, oldest first."""
        count = max(1, min(count, self.limits.read_count_max))
        entries: Any = await self._redis.xrange(
            stream_key(partition), f"({after_id}", up_to_id, count=count
        )
        return _changes(partition, entries)


def _client(redis_url: str, timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(
        redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # No client-side retries: the callers' loops own waiting and backoff.
        retry=Retry(NoBackoff(), retries=0),
        protocol=2,  # the answer shapes parsed here
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _StreamKeys:
    """Every partition's stream key, encoded once."""

    def __init__(self, partition_count: int) -> None:
        self.bulks = [_stream_key_bulk(p) for p in range(partition_count)]
        self.partition_of = {stream_key(p).encode(): p for p in range(partition_count)}
        self._all = tuple(range(partition_count))
        self._all_joined = b"".join(self.bulks)

    def joined(self, partitions: tuple[int, ...]) -> bytes:
        """The keys of ``partitions``, in that order, as one run of bulk strings."""
        if partitions == self._all:
            return self._all_joined
        assert all(0 <= p < len(self.bulks) for p in partitions), "partition out of range"
        return b"".join(self.bulks[p] for p in partitions)


# Entry ids the XREAD builder keeps encoded, per partition read. A position moves with every
# entry read, so the cache fills with ids of the past: past this many it starts afresh (one
# read re-encodes its ids, ~0.3 ms for 1024 streams, every few reads under load at most).
READ_IDS_CACHED_PER_PARTITION_MAX = 4


class _EncodedIds(dict[str, bytes]):
    def __missing__(self, entry_id: str) -> bytes:
        encoded = self[entry_id] = bulk(entry_id.encode())
        return encoded


class _ReadCommand:
    """XREAD frames: the streams' keys joined once per set, each position's id encoded once."""

    def __init__(self, streams: _StreamKeys) -> None:
        self._streams = streams
        self._keys: tuple[tuple[int, ...], bytes] = ((), b"")  # the last set read, joined
        self._ids = _EncodedIds()

    def build(self, positions: Mapping[int, str], count: int, block_ms: int | None) -> bytes:
        partitions = tuple(positions)
        if partitions != self._keys[0]:
            self._keys = (partitions, self._streams.joined(partitions))
        keys = self._keys[1]
        if len(self._ids) > READ_IDS_CACHED_PER_PARTITION_MAX * len(partitions):
            self._ids.clear()
        ids = b"".join(map(self._ids.__getitem__, positions.values()))
        head = b"$5\r\nXREAD\r\n$5\r\nCOUNT\r\n" + _number(count)
        arguments = 4 + 2 * len(partitions)
        if block_ms is not None:
            head += b"$5\r\nBLOCK\r\n" + _number(block_ms)
            arguments += 2
        return _command(arguments, b"%b$7\r\nSTREAMS\r\n%b%b" % (head, keys, ids))


def _stream_changes(partition: int, entries: Iterable[list[Any]]) -> list[StreamChange]:
    """Entries as a raw XREAD answer has them: [id, [field, value, ...]]."""
    changes = []
    for entry_id, fields in entries:
        if fields[0] == STREAM_FIELD:  # the one field the publisher writes
            payload = fields[1]
        else:
            payload = dict(zip(fields[::2], fields[1::2], strict=True))[STREAM_FIELD]
        changed = events_pb2.AvailabilityChanged.FromString(payload)
        changes.append((partition, _text(entry_id), changed))
    return changes


def _changes(
    partition: int, entries: Iterable[tuple[bytes, dict[bytes, bytes]]]
) -> list[StreamChange]:
    return [
        (
            partition,
            _text(entry_id),
            events_pb2.AvailabilityChanged.FromString(fields[STREAM_FIELD]),
        )
        for entry_id, fields in entries
    ]


def _level(
    key: InventoryKey, fields: Mapping[bytes, bytes]
) -> tuple[inventory_pb2.StockLevel, int, int]:
    available = int(fields[b"available"])
    # Levels written before staleness and deliveries existed lack these fields: zero.
    stale_buffer = int(fields.get(b"stale_buffer", 0))
    stale_since_ms = int(fields.get(b"stale_since_ms", 0))
    incoming = int(fields.get(b"incoming", 0))
    incoming_eta_ms = int(fields.get(b"incoming_eta_ms", 0))
    allotted = int(fields.get(b"allotted", 0))  # a hot key's home (written since then)
    level = inventory_pb2.StockLevel(
        key=inventory_pb2.InventoryKey(
            merchant_id=key.merchant_id, sku_id=key.sku_id, location_id=key.location_id
        ),
        on_hand=int(fields[b"on_hand"]),
        reserved=int(fields[b"reserved"]),
        safety_stock=int(fields[b"safety_stock"]),
        available=available,
        sellable=max(available - stale_buffer - allotted, 0),
        version=int(fields[b"version"]),
        exists=True,
        exposure=max(-available, 0),
        degraded=stale_since_ms != 0,
        stale_buffer=stale_buffer,
        stale_since_ms=stale_since_ms,
        incoming=incoming,
        incoming_eta_ms=incoming_eta_ms,
        allotted=allotted,
    )
    return level, int(fields[b"partition"]), int(fields[b"lsn"])
