"""Per-key budgets kept in the sessions store, so every replica draws on one budget.

``limits.shared: true``. The buckets are those of ``raylm.serve.guards`` (a minute's worth
at most, refilled continuously; tokens taken after the answer, so a key may go into
debt), but kept where the conversations are (``sessions.store``):

- Redis: one Lua script per request (atomic, on Redis's own clock, so replicas on nodes
  whose clocks disagree still agree), keys expiring once the bucket would be full again.
  One budget for the whole cluster.
- SQLite: one write transaction per request on the node's file (off the event loop).
  Shared by the replicas of one node only, as the conversations are.

If the store fails, the request is let through and a warning logged: a store outage
should not take the service down with it (the conversations' routes still answer 503).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from typing import Any

from raylm.serve.guards import rate_limited
from raylm.serve.store import open_sqlite, sqlite_path

logger = logging.getLogger(__name__)

REDIS_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local function level(key, size)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, u = tonumber(v[1]), tonumber(v[2])
  if not l then return size end
  return math.min(size, l + (now - u) * size / 60)
end
local function put(key, l, size)
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(now))
  local full_in = (size - l) * 60 / size
  redis.call('PEXPIRE', key, math.ceil(full_in * 1000) + 1000)
end
if ARGV[1] == 'charge' then
  put(KEYS[2], level(KEYS[2], tpm) - tonumber(ARGV[4]), tpm)
  return {0, '0'}
end
if tpm > 0 then
  local l = level(KEYS[2], tpm)
  if l < 0 then return {2, tostring(-l * 60 / tpm)} end
end
if rpm > 0 then
  local l = level(KEYS[1], rpm)
  if l < 1 then return {1, tostring((1 - l) * 60 / rpm)} end
  put(KEYS[1], l - 1, rpm)
end
return {0, '0'}
"""
"""Admit (``ARGV[1]='admit'``) or charge one key; returns (0 admitted | 1 requests |
2 tokens, seconds to wait)."""

LIMITS = {1: "requests_per_minute", 2: "tokens_per_minute"}


class SharedBudgets:
    """The budgets of every key, in a store all replicas share (see the module doc)."""

    def __init__(
        self, url: str, namespace: str, rpm: float | None, tpm: float | None
    ) -> None:  # fmt: skip
        self.rpm, self.tpm = rpm or 0.0, tpm or 0.0
        self.backend = (
            SqliteBuckets(sqlite_path(url), namespace)
            if url.startswith("sqlite://")
            else RedisBuckets(url, namespace)
        )

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    @property
    def counts_tokens(self) -> bool:
        return bool(self.tpm)

    async def admit(self, key: str) -> None:
        try:
            which, wait = await self.backend.run(key, "admit", self.rpm, self.tpm, 0)
        except Exception as err:  # fail open: see the module doc
            logger.warning("budget store failed, request admitted: %r", err)
            return
        if which:
            per_minute = self.rpm if which == 1 else self.tpm
            raise rate_limited(LIMITS[which], per_minute, wait, scope="app")

    async def charge(self, key: str, tokens: int) -> None:
        if not self.tpm or tokens <= 0:
            return
        try:
            await self.backend.run(key, "charge", self.rpm, self.tpm, tokens)
        except Exception as err:
            logger.warning("budget store failed, %d tokens not charged: %r", tokens, err)

    async def close(self) -> None:
        await self.backend.close()


class RedisBuckets:
    """``REDIS_SCRIPT`` over redis-py's asyncio client (EVALSHA, loaded on first use)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url, self.namespace = url, namespace
        self._client: Any = None
        self._script: Any = None

    async def run(
        self, key: str, mode: str, rpm: float, tpm: float, tokens: int
    ) -> tuple[int, float]:  # fmt: skip
        if self._client is None:  # made inside the event loop that will use it
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(self.url)
            self._script = self._client.register_script(REDIS_SCRIPT)
        # One hash tag per key: both buckets live in one slot of a Redis Cluster.
        base = f"raylm:{self.namespace}:budget:{{{key}}}"
        which, wait = await self._script(
            keys=[f"{base}:requests", f"{base}:tokens"], args=[mode, rpm, tpm, tokens]
        )
        return int(which), float(wait)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class SqliteBuckets:
    """The same buckets as rows of the node's sessions file, one transaction a request."""

    def __init__(self, path: str, namespace: str) -> None:
        self.path, self.namespace = path, namespace
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._purged = 0.0

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:  # autocommit: _run opens its own IMMEDIATE transaction
            self._conn = open_sqlite(
                self.path,
                "CREATE TABLE IF NOT EXISTS budgets (key TEXT PRIMARY KEY, level REAL NOT "
                "NULL, updated REAL NOT NULL)",
                autocommit=True,
            )
        return self._conn

    def _run(
        self, key: str, mode: str, rpm: float, tpm: float, tokens: int
    ) -> tuple[int, float]:  # fmt: skip
        base = f"{self.namespace}/{key}"
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")  # one writer: read-modify-write is atomic
            try:
                result = self._step(db, base, mode, rpm, tpm, tokens, time.time())
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return result

    def _step(
        self, db: sqlite3.Connection, base: str, mode: str, rpm: float, tpm: float,
        tokens: int, now: float,
    ) -> tuple[int, float]:  # fmt: skip
        def level(name: str, size: float) -> float:
            row = db.execute("SELECT level, updated FROM budgets WHERE key = ?", (name,)).fetchone()
            return size if row is None else min(size, row[0] + (now - row[1]) * size / 60)

        def put(name: str, value: float) -> None:
            db.execute("INSERT OR REPLACE INTO budgets VALUES (?, ?, ?)", (name, value, now))

        if now - self._purged > 3600:  # a day-idle bucket is full: the row can go
            db.execute("DELETE FROM budgets WHERE updated < ?", (now - 86400,))
            self._purged = now
        if mode == "charge":
            put(f"{base}:tokens", level(f"{base}:tokens", tpm) - tokens)
            return 0, 0.0
        if tpm:
            tokens_left = level(f"{base}:tokens", tpm)
            if tokens_left < 0:
                return 2, -tokens_left * 60 / tpm
        if rpm:
            left = level(f"{base}:requests", rpm)
            if left < 1:
                return 1, (1 - left) * 60 / rpm
            put(f"{base}:requests", left - 1)
        return 0, 0.0

    async def run(
        self, key: str, mode: str, rpm: float, tpm: float, tokens: int
    ) -> tuple[int, float]:  # fmt: skip
        return await asyncio.to_thread(self._run, key, mode, rpm, tpm, tokens)

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
