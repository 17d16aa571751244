"""raylm.serve.store: both backends (a SQLite file, a real redis-server) keep a response,
hand it back only to the key that wrote it, delete it, and forget it after the retention."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from raylm.config import ConfigError
from raylm.serve.store import (
    DEFAULT_SQLITE,
    StoredResponse,
    check_url,
    created_from_id,
    new_response_id,
    open_store,
    sqlite_path,
)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'sessions.sqlite'}"
    return request.getfixturevalue("redis_url")


def record(owner: str = "alice", rid: str | None = None) -> StoredResponse:
    rid = rid or new_response_id()
    return StoredResponse(
        id=rid,
        owner=owner,
        response={"id": rid, "object": "response", "output": []},
        items=[{"type": "message", "role": "user", "content": "hi"}],
        input_count=1,
    )


def test_put_get_delete_and_ownership(store_url: str) -> None:
    async def run() -> None:
        store = open_store(store_url, retention_s=60, namespace="t-own")
        r = record()
        await store.put(r)
        got = await store.get(r.id, "alice")
        assert got == r
        assert await store.get(r.id, "bob") is None  # another key sees nothing
        assert not await store.delete(r.id, "bob")
        assert await store.get(r.id, "alice") == r
        assert await store.delete(r.id, "alice")
        assert await store.get(r.id, "alice") is None
        assert not await store.delete(r.id, "alice")
        await store.close()

    asyncio.run(run())


def test_expiry(store_url: str) -> None:
    async def run() -> None:
        store = open_store(store_url, retention_s=0.3, namespace="t-exp")
        r = record()
        await store.put(r)
        assert await store.get(r.id, "alice") == r
        await asyncio.sleep(0.5)
        assert await store.get(r.id, "alice") is None
        assert not await store.delete(r.id, "alice")
        await store.close()

    asyncio.run(run())


def test_namespaces_and_stores_are_shared(store_url: str) -> None:
    """Two store objects (two replicas) on one URL see each other's writes; another app's
    namespace does not."""

    async def run() -> None:
        one = open_store(store_url, 60, "app-a")
        two = open_store(store_url, 60, "app-a")
        other = open_store(store_url, 60, "app-b")
        r = record()
        await one.put(r)
        assert await two.get(r.id, "alice") == r
        assert await other.get(r.id, "alice") is None
        for s in (one, two, other):
            await s.close()

    asyncio.run(run())


def test_a_redeploy_finds_the_conversations_again(store_url: str) -> None:
    """Every replica of an app closed (the app deleted), then new ones opened on the same
    URL and namespace (the app deployed again): the responses are still there."""

    async def run() -> None:
        old = open_store(store_url, 60, "app-redeployed")
        r = record()
        await old.put(r)
        await old.close()
        new = open_store(store_url, 60, "app-redeployed")
        assert await new.get(r.id, "alice") == r
        await new.close()

    asyncio.run(run())


def test_sqlite_purges_expired_rows(tmp_path: Path) -> None:
    import sqlite3

    from raylm.serve import store as store_mod

    async def run() -> None:
        s = open_store(f"sqlite://{tmp_path / 'db.sqlite'}", retention_s=0.1)
        await s.put(record())
        await asyncio.sleep(0.2)
        s._purged = 0.0  # the next write purges (it does so at most every PURGE_EVERY_S)
        await s.put(record())
        await s.close()

    asyncio.run(run())
    rows = sqlite3.connect(tmp_path / "db.sqlite").execute("SELECT COUNT(*) FROM responses")
    assert rows.fetchone()[0] == 1
    assert store_mod.PURGE_EVERY_S > 0
    mode = sqlite3.connect(tmp_path / "db.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "wal"


def test_urls() -> None:
    assert check_url("redis://h:6379/0") and check_url("sqlite://")
    assert sqlite_path("sqlite:///srv/s.db") == "/srv/s.db"
    assert sqlite_path("sqlite://") == str(Path(DEFAULT_SQLITE).expanduser())
    with pytest.raises(ConfigError, match=r"did you mean 'redis://'\?.*sqlite:///PATH"):
        check_url("reddis://h:6379")
    with pytest.raises(ConfigError, match="expected sqlite:///PATH"):
        check_url("postgres://h/db")
    with pytest.raises(ConfigError, match="not a store URL"):
        check_url("/var/lib/sessions.db")


def test_response_ids_carry_their_time() -> None:
    now = time.time()
    rid = new_response_id(now)
    assert rid.startswith("resp_") and len(rid) == 37
    assert abs(created_from_id(rid) - now) < 0.002
    assert created_from_id("resp_" + "z" * 32) is None
    assert created_from_id("resp_abc") is None
    assert new_response_id() != new_response_id()


def test_sessions_config_reaches_the_replicas(tmp_path: Path, monkeypatch) -> None:
    from raylm.config import load
    from raylm.serve import app

    def cfg(*overrides: str):
        return load("serve", [], ["model.path=m", "auth.api_keys=[sk-unit]", *overrides])

    monkeypatch.chdir(tmp_path)
    assert app.sessions_settings(cfg()) == {
        "store": "sqlite://",
        "retention_s": 7 * 24 * 3600.0,
        "namespace": "raylm",
    }
    rel = app.sessions_settings(cfg("sessions.store=sqlite://state/s.db", "app_name=x"))
    assert rel["store"] == f"sqlite://{tmp_path}/state/s.db" and rel["namespace"] == "x"
    url = "redis://10.0.0.5:6379/2"
    assert app.sessions_settings(cfg(f"sessions.store={url}"))["store"] == url
    with pytest.raises(ConfigError, match=r"sessions\.store='mysql://h/db' is not a store URL"):
        cfg("sessions.store=mysql://h/db")
    with pytest.raises(ConfigError, match=r"sessions\.retention_s=0"):
        cfg("sessions.retention_s=0")
    with pytest.raises(ConfigError, match="did you mean 'retention_s'"):
        cfg("sessions.retention=60")


def test_a_replica_opens_the_store_its_settings_name(tmp_path: Path) -> None:
    """What each replica does with the ``raylm.sessions`` args the deploy wrote."""
    from raylm.serve import app, server
    from raylm.serve.store import RedisStore, SqliteStore

    url = f"sqlite://{tmp_path}/s.db"
    conv = server.conversations(
        server.ServerSettings(sessions={"store": url, "retention_s": 5.0, "namespace": "n"})
    )
    assert isinstance(conv.store, SqliteStore) and conv.store.path == f"{tmp_path}/s.db"
    assert (conv.store.retention_s, conv.store.namespace) == (5.0, "n")
    assert isinstance(server.conversations(server.ServerSettings()).store, SqliteStore)
    from raylm.config import load

    cfg = load("serve", [], ["model.path=m", "auth.api_keys=[k]", "sessions.store=redis://h/1"])
    settings = server.ServerSettings(sessions=app.sessions_settings(cfg))
    assert isinstance(server.conversations(settings).store, RedisStore)
