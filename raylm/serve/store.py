"""Where stored Responses API conversations live: one interface, an embedded and a shared backend.

vLLM's own Responses store is a dict in each replica's memory: a second replica, a
restarted one or a redeployed app cannot continue a conversation, and nothing is ever
evicted. raylm keeps the state outside the replicas instead, chosen by ``sessions.store``:

- ``sqlite:///PATH`` (the default, ``sqlite://`` for ``~/.cache/raylm/sessions.sqlite``): a
  file on the node, in WAL mode so several replicas on one node read and write it at once.
  It is shared by the replicas of one node only.
- ``redis://HOST:PORT/DB`` (or ``rediss://`` for TLS): one Redis for the whole cluster.

Each stored response is one self-contained record: the response as the client received it
and the conversation's items up to and including its output, so continuing from it is a
single read whichever replica serves the next turn (and deleting an earlier turn breaks
no later one). A record belongs to the sha256 of the API key that created it and a read
with another key finds nothing, exactly as for an absent id. Records expire
``sessions.retention_s`` after they were written (Redis's own expiry; SQLite purges on
write and never returns an expired row).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from raylm.config import ConfigError

SCHEMES = ("sqlite", "redis", "rediss")
"""URL schemes ``sessions.store`` accepts."""

DEFAULT_SQLITE = "~/.cache/raylm/sessions.sqlite"
"""The file ``sqlite://`` (no path) means, on each node."""

PURGE_EVERY_S = 60.0
"""How often (at most) a SQLite store deletes expired rows, on a write."""


@dataclass
class StoredResponse:
    """One stored response and the conversation that led to it."""

    id: str
    owner: str
    """sha256 of the API key that created it ("" when the app has no keys)."""
    response: dict[str, Any]
    """The response object as returned to the client (what retrieve answers)."""
    items: list[dict[str, Any]] = field(default_factory=list)
    """Every input item of the conversation so far, then this response's output items:
    the input of the next turn, before its own new items."""
    input_count: int = 0
    """How many of ``items`` were this response's input (the rest is its output)."""
    created_at: float = field(default_factory=time.time)

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, data: str | bytes) -> StoredResponse:
        return cls(**json.loads(data))


class SessionStore(Protocol):
    """What the Responses API needs of a store; every method is safe across replicas."""

    retention_s: float

    async def put(self, record: StoredResponse) -> None:
        """Write (or overwrite) ``record``; it expires ``retention_s`` from now."""

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The record if it exists, has not expired and belongs to ``owner``; else None."""

    async def delete(self, response_id: str, owner: str) -> bool:
        """Delete ``owner``'s record; False if there was none to delete."""

    async def close(self) -> None:
        """Release connections."""


def new_response_id(now: float | None = None) -> str:
    """``resp_`` + creation time (ms, 12 hex digits) + 80 random bits. The time lets a
    miss be explained (older than the retention: expired) without keeping tombstones."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"resp_{ms:012x}{secrets.token_hex(10)}"


def created_from_id(response_id: str) -> float | None:
    """The creation time written in a raylm response id, or None for any other id."""
    stamp = response_id.removeprefix("resp_")[:12]
    if not response_id.startswith("resp_") or len(response_id) != 37:
        return None
    try:
        return int(stamp, 16) / 1000
    except ValueError:
        return None


def check_url(url: str, key: str = "sessions.store") -> str:
    """``url`` if its scheme is one raylm has a backend for, else a ConfigError naming them."""
    import difflib

    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in SCHEMES:
        close = difflib.get_close_matches(scheme, SCHEMES, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}://'?)" if close and sep else ""
        raise ConfigError(
            f"{key}={url!r} is not a store URL{hint}: expected sqlite:///PATH "
            "(a file on the node; sqlite:// for the default), redis://HOST:PORT/DB or "
            "rediss://HOST:PORT/DB"
        )
    return url


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite://`` URL: the rest of the URL, or the default; ``~`` expanded."""
    path = url.removeprefix("sqlite://") or DEFAULT_SQLITE
    return os.path.expanduser(path)


def open_store(url: str, retention_s: float, namespace: str = "raylm") -> SessionStore:
    """The backend for ``url``; ``namespace`` (the app name) keeps apps sharing one store
    apart."""
    check_url(url)
    if url.startswith("sqlite://"):
        return SqliteStore(sqlite_path(url), retention_s, namespace)
    return RedisStore(url, retention_s, namespace)


def open_sqlite(path: str, *schema: str, autocommit: bool = False) -> sqlite3.Connection:
    """The node's sessions file in WAL mode (with NORMAL sync: durable across crashes), its
    ``schema`` applied: one opener for the conversation store and the shared budgets."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=30, check_same_thread=False, isolation_level=None if autocommit else ""
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for statement in schema:
        conn.execute(statement)
    conn.commit()
    return conn


class SqliteStore:
    """A SQLite file on the node (WAL mode), read and written off the event loop."""

    def __init__(self, path: str, retention_s: float, namespace: str = "raylm") -> None:
        self.path, self.retention_s, self.namespace = path, retention_s, namespace
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._purged = 0.0

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_sqlite(
                self.path,
                "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, owner TEXT NOT "
                "NULL, expires_at REAL NOT NULL, data TEXT NOT NULL)",
                "CREATE INDEX IF NOT EXISTS responses_expiry ON responses(expires_at)",
            )
        return self._conn

    def _key(self, response_id: str) -> str:
        return f"{self.namespace}/{response_id}"

    def _put(self, record: StoredResponse) -> None:
        now = time.time()
        with self._lock:
            db = self._db()
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                (self._key(record.id), record.owner, now + self.retention_s, record.dumps()),
            )
            if now - self._purged > PURGE_EVERY_S:
                db.execute("DELETE FROM responses WHERE expires_at < ?", (now,))
                self._purged = now
            db.commit()

    def _get(self, response_id: str, owner: str) -> StoredResponse | None:
        with self._lock:
            row = (
                self._db()
                .execute(
                    "SELECT data FROM responses WHERE id = ? AND owner = ? AND expires_at >= ?",
                    (self._key(response_id), owner, time.time()),
                )
                .fetchone()
            )
        return StoredResponse.loads(row[0]) if row else None

    def _delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            db = self._db()
            cur = db.execute(
                "DELETE FROM responses WHERE id = ? AND owner = ? AND expires_at >= ?",
                (self._key(response_id), owner, time.time()),
            )
            db.commit()
            return cur.rowcount > 0

    async def put(self, record: StoredResponse) -> None:
        await asyncio.to_thread(self._put, record)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        return await asyncio.to_thread(self._get, response_id, owner)

    async def delete(self, response_id: str, owner: str) -> bool:
        return await asyncio.to_thread(self._delete, response_id, owner)

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class RedisStore:
    """One Redis for the cluster (redis-py's asyncio client); expiry is Redis's own."""

    def __init__(self, url: str, retention_s: float, namespace: str = "raylm") -> None:
        self.url, self.retention_s, self.namespace = url, retention_s, namespace
        self._client: Any = None

    def _redis(self) -> Any:
        # Made on first use, inside the event loop that will use it.
        if self._client is None:
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(self.url)
        return self._client

    def _key(self, response_id: str) -> str:
        return f"raylm:{self.namespace}:response:{response_id}"

    async def put(self, record: StoredResponse) -> None:
        ttl_ms = max(1, int(self.retention_s * 1000))
        await self._redis().set(self._key(record.id), record.dumps(), px=ttl_ms)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        data = await self._redis().get(self._key(response_id))
        if data is None:
            return None
        record = StoredResponse.loads(data)
        return record if record.owner == owner else None

    async def delete(self, response_id: str, owner: str) -> bool:
        if await self.get(response_id, owner) is None:
            return False
        return bool(await self._redis().delete(self._key(response_id)))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
