"""Per-key budgets shared by replicas through the sessions store (``limits.shared``), with
SQLite and a real Redis, and the budget settings the deploy step writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from raylm.config import ConfigError
from raylm.serve.budgets import SharedBudgets
from raylm.serve.validation import ApiError


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/s.sqlite"
    return request.getfixturevalue("redis_url")


def test_two_replicas_draw_on_one_budget(store_url: str, request: pytest.FixtureRequest) -> None:
    ns = f"budgets-{request.node.name}"

    async def run() -> None:
        one = SharedBudgets(store_url, ns, rpm=3, tpm=None)
        two = SharedBudgets(store_url, ns, rpm=3, tpm=None)
        await one.admit("alice")
        await two.admit("alice")
        await one.admit("alice")
        with pytest.raises(ApiError) as err:
            await two.admit("alice")
        assert err.value.status == 429 and err.value.headers == {"retry-after": "20"}
        assert "requests_per_minute=3 for the app" in err.value.message
        await two.admit("bob")  # another key, another bucket
        other = SharedBudgets(store_url, ns + "-other-app", rpm=3, tpm=None)
        await other.admit("alice")  # another app's namespace
        for b in (one, two, other):
            await b.close()

    asyncio.run(run())


def test_tokens_charged_on_one_replica_limit_the_other(
    store_url: str, request: pytest.FixtureRequest
) -> None:
    ns = f"budgets-{request.node.name}"

    async def run() -> None:
        one = SharedBudgets(store_url, ns, rpm=None, tpm=600)
        two = SharedBudgets(store_url, ns, rpm=None, tpm=600)
        await one.admit("alice")
        await one.charge("alice", 650)  # 50 in debt, 10 tokens/s
        with pytest.raises(ApiError) as err:
            await two.admit("alice")
        assert "tokens_per_minute" in err.value.message
        assert 4 <= int(err.value.headers["retry-after"]) <= 5
        await one.close(), await two.close()

    asyncio.run(run())


def test_a_failing_store_lets_requests_through(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        budgets = SharedBudgets("redis://127.0.0.1:1/0", "x", rpm=1, tpm=10)
        await budgets.admit("alice")
        await budgets.admit("alice")
        await budgets.charge("alice", 5)
        await budgets.close()

    asyncio.run(run())
    assert "budget store failed" in caplog.text


def test_budget_settings_reach_the_replicas(tmp_path: Path, monkeypatch) -> None:
    from raylm.config import load
    from raylm.serve import app, server

    def cfg(*overrides: str):
        return load("serve", [], ["model.path=m", "auth.api_keys=[sk-unit]", *overrides])

    monkeypatch.chdir(tmp_path)
    limits = ["limits.requests_per_minute=60", "limits.tokens_per_minute=1000"]
    split = app.guard_settings(cfg(*limits, "autoscaling.max_replicas=4"))
    assert split["requests_per_minute"] == 15 and split["tokens_per_minute"] == 250
    assert split["shared_limits"] is False and split["filters"] == {}
    assert split["access_log"] is True and split["log_prompts"] is False
    whole = app.guard_settings(cfg(*limits, "autoscaling.max_replicas=4", "limits.shared=true"))
    assert whole["requests_per_minute"] == 60 and whole["shared_limits"] is True
    settings = server.ServerSettings(checks=whole, sessions={"store": f"sqlite://{tmp_path}/x"})
    assert isinstance(server.budgets(settings), SharedBudgets)
    assert server.budgets(server.ServerSettings(checks=split)) is None
    with pytest.raises(ConfigError, match="did you mean 'requests_per_minute'"):
        cfg("limits.request_per_minute=5")
    with pytest.raises(ConfigError, match=r"limits\.tokens_per_minute"):
        cfg("limits.tokens_per_minute=0")
    with pytest.raises(ConfigError, match=r"limits\.max_tokens=99999 > engine\.max_model_len"):
        cfg("limits.max_tokens=99999")
    with pytest.raises(ConfigError, match=r"filters\.blocklist: .* is not a file"):
        cfg("filters.blocklist=[nope.txt]")
    (tmp_path / "block.txt").write_text("bad\n")
    f = app.guard_settings(cfg("filters.blocklist=[block.txt]", "filters.pii=true"))
    assert f["filters"] == {"blocklist": [str(tmp_path / "block.txt")], "pii": True, "output": True}
